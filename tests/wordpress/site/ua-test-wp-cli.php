<?php
/**
 * Test-only stand-in for WP-CLI (not installable here): a `WP_CLI` class that records what
 * a command prints, so the plugin's command class runs inside a real WordPress.
 *
 * @package UsageAgentTests
 */

defined( 'ABSPATH' ) || exit;

/** Thrown by WP_CLI::error(), as the real one exits. */
class UA_Test_WP_CLI_Exit extends Exception {}

/** Records output instead of printing it. */
class WP_CLI {
	public static $lines = array();
	public static function line( $text = '' ) { self::$lines[] = array( 'line', (string) $text ); }
	public static function log( $text ) { self::$lines[] = array( 'log', (string) $text ); }
	public static function success( $text ) { self::$lines[] = array( 'success', (string) $text ); }
	public static function warning( $text ) { self::$lines[] = array( 'warning', (string) $text ); }
	public static function error( $text ) {
		self::$lines[] = array( 'error', (string) $text );
		throw new UA_Test_WP_CLI_Exit( (string) $text );
	}
	public static function add_command( $name, $callable ) {}
}

/** Runs one subcommand of Usage_Agent_CLI the way WP-CLI maps it. */
class UA_Test_WP_CLI_Runner {
	public static function run( string $command, array $assoc_args ): array {
		// Subcommands as WP-CLI names them: the method's name, or its `@subcommand` tag.
		$methods = array();
		foreach ( ( new ReflectionClass( 'Usage_Agent_CLI' ) )->getMethods( ReflectionMethod::IS_PUBLIC ) as $method ) {
			$name = preg_match( '/@subcommand\s+(\S+)/', (string) $method->getDocComment(), $m ) ? $m[1] : $method->getName();
			$methods[ $name ] = $method->getName();
		}
		if ( ! isset( $methods[ $command ] ) ) {
			return array( 'exit' => 2, 'output' => array( array( 'error', 'no such subcommand' ) ) );
		}
		$exit = 0;
		try {
			( new Usage_Agent_CLI() )->{$methods[ $command ]}( array(), $assoc_args );
		} catch ( UA_Test_WP_CLI_Exit $e ) {
			$exit = 1;
		}
		return array( 'exit' => $exit, 'output' => WP_CLI::$lines );
	}
}
