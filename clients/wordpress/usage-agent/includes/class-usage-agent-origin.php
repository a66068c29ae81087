<?php
/**
 * Which plugin or theme made an AI call, read from the PHP call stack.
 *
 * The innermost frame in a plugin's or theme's directory names it: `plugin:<slug>` (must-use
 * plugins too, and plugin folders that are symbolic links), `theme:<slug>`, and `core` when
 * only WordPress itself is on the stack. Frames of this plugin are skipped, so metering never
 * names itself.
 *
 * @package UsageAgent
 */

defined( 'ABSPATH' ) || exit;

/**
 * Finds the origin of a call.
 */
final class Usage_Agent_Origin {

	/**
	 * The origin of the code that is running now, before the `usage_agent_origin` filter.
	 */
	public static function detect(): string {
		$frames = debug_backtrace( DEBUG_BACKTRACE_IGNORE_ARGS );
		return self::from_files( array_column( $frames, 'file' ) );
	}

	/**
	 * The origin named by the innermost plugin or theme file of a list of file paths.
	 *
	 * @param string[] $files Files of the call stack, innermost first.
	 */
	public static function from_files( array $files ): string {
		$own   = self::normalize( USAGE_AGENT_DIR ) . '/';
		$roots = array(
			array( self::normalize( WP_PLUGIN_DIR ) . '/', 'plugin' ),
			array( self::normalize( WPMU_PLUGIN_DIR ) . '/', 'plugin' ),
		);
		$theme_dirs = isset( $GLOBALS['wp_theme_directories'] ) ? (array) $GLOBALS['wp_theme_directories'] : array( get_theme_root() );
		foreach ( $theme_dirs as $theme_dir ) {
			$roots[] = array( self::normalize( (string) $theme_dir ) . '/', 'theme' );
		}
		// A plugin folder that is a symbolic link: PHP names its files by their real path.
		$linked = isset( $GLOBALS['wp_plugin_paths'] ) ? (array) $GLOBALS['wp_plugin_paths'] : array();
		foreach ( $linked as $dir => $real_dir ) {
			$roots[] = array( self::normalize( (string) $real_dir ) . '/', 'plugin', basename( (string) $dir ) );
		}
		foreach ( $files as $file ) {
			if ( ! is_string( $file ) || '' === $file ) {
				continue;
			}
			$file = self::normalize( $file );
			if ( 0 === strpos( $file, $own ) ) {
				continue;
			}
			foreach ( $roots as $root ) {
				if ( 0 !== strpos( $file, $root[0] ) ) {
					continue;
				}
				if ( isset( $root[2] ) ) {
					return self::clean( $root[1] . ':' . $root[2] );
				}
				$rest = substr( $file, strlen( $root[0] ) );
				$slug = strtok( $rest, '/' );
				if ( false === $slug || '' === $slug ) {
					continue;
				}
				if ( $rest === $slug ) {
					// A single-file plugin: its file name without `.php`.
					$slug = preg_replace( '/\.php$/', '', $slug );
				}
				return self::clean( $root[1] . ':' . $slug );
			}
		}
		return 'core';
	}

	/**
	 * Makes a value the agent accepts: 1 to 64 characters of `[a-z0-9._:/-]`.
	 *
	 * @param string $origin The origin as found or filtered.
	 */
	public static function clean( string $origin ): string {
		$origin = substr( (string) preg_replace( '/[^a-z0-9._:\/-]/', '-', strtolower( $origin ) ), 0, 64 );
		return '' === $origin ? 'core' : $origin;
	}

	/**
	 * A path with forward slashes and no trailing slash.
	 *
	 * @param string $path A file or directory path.
	 */
	private static function normalize( string $path ): string {
		return rtrim( wp_normalize_path( $path ), '/' );
	}
}
