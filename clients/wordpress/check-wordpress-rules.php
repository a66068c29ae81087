<?php
/**
 * The WordPress rules phpcs cannot check without the WordPress Coding Standards, over
 * every PHP file of the plugin:
 *
 * - each file stops unless WordPress loaded it (`defined( 'ABSPATH' ) || exit;`);
 * - no superglobal is read (`$_GET`, `$_POST`, `$_REQUEST`, `$_COOKIE`, `$_SERVER`,
 *   `$_FILES`): WordPress's own functions read and sanitize requests for the plugin;
 * - every value an `echo`, `print` or `printf` outputs is a literal or goes through an
 *   escaping function (esc_html, esc_attr, esc_url, their translated forms, or one of the
 *   few WordPress helpers that return escaped HTML).
 *
 * Usage: php check-wordpress-rules.php [plugin-dir]; exits 1 and names each finding.
 *
 * @package UsageAgent
 */

$usage_agent_dir      = $argv[1] ?? __DIR__ . '/usage-agent';
$usage_agent_escapers = array( 'esc_html', 'esc_attr', 'esc_url', 'esc_html__', 'esc_attr__', 'esc_html_x', 'esc_attr_x', 'checked', 'disabled', 'selected', 'wp_nonce_field' );
$usage_agent_findings = array();

$usage_agent_files = new RecursiveIteratorIterator( new RecursiveDirectoryIterator( $usage_agent_dir, FilesystemIterator::SKIP_DOTS ) );
foreach ( $usage_agent_files as $usage_agent_file ) {
	if ( 'php' !== $usage_agent_file->getExtension() ) {
		continue;
	}
	$path = $usage_agent_file->getPathname();
	$code = (string) file_get_contents( $path );
	if ( false === strpos( $code, "defined( 'ABSPATH' ) || exit;" ) ) {
		$usage_agent_findings[] = "$path: no `defined( 'ABSPATH' ) || exit;`";
	}
	$tokens = token_get_all( $code );
	$count  = count( $tokens );
	for ( $i = 0; $i < $count; $i++ ) {
		$token = $tokens[ $i ];
		if ( ! is_array( $token ) ) {
			continue;
		}
		if ( T_VARIABLE === $token[0] && preg_match( '/^\$_(GET|POST|REQUEST|COOKIE|SERVER|FILES)$/', $token[1] ) ) {
			$usage_agent_findings[] = "$path:{$token[2]}: reads {$token[1]}";
		}
		$printf = T_STRING === $token[0] && in_array( $token[1], array( 'printf', 'vprintf' ), true );
		if ( T_ECHO !== $token[0] && T_PRINT !== $token[0] && ! $printf ) {
			continue;
		}
		// Walk the statement; remember which calls enclose each token.
		$stack    = array();
		$pending  = null;
		$argument = 0;
		for ( $j = $i + 1; $j < $count; $j++ ) {
			$t = $tokens[ $j ];
			if ( ';' === $t && array() === $stack ) {
				break;
			}
			if ( '(' === $t ) {
				$stack[] = $pending;
				$pending = null;
				continue;
			}
			if ( ')' === $t ) {
				array_pop( $stack );
				continue;
			}
			if ( ',' === $t && 1 === count( $stack ) ) {
				++$argument;
			}
			if ( ! is_array( $t ) ) {
				continue;
			}
			if ( T_WHITESPACE === $t[0] ) {
				continue;
			}
			// A printf's format (its first argument) is checked like any value, the rest too.
			$escaped = (bool) array_intersect( $usage_agent_escapers, array_filter( $stack ) );
			if ( T_STRING === $t[0] ) {
				$pending = $t[1];
				if ( ! $escaped && ! in_array( $t[1], $usage_agent_escapers, true ) && ! ( $printf && 1 === count( $stack ) && 0 === $argument ) ) {
					// A call's result printed as it is, unless it is an escaper's argument.
					$next = $j + 1;
					while ( $next < $count && is_array( $tokens[ $next ] ) && T_WHITESPACE === $tokens[ $next ][0] ) {
						++$next;
					}
					if ( '(' === $tokens[ $next ] ) {
						$usage_agent_findings[] = "$path:{$t[2]}: prints {$t[1]}() unescaped";
					}
				}
				continue;
			}
			if ( T_VARIABLE === $t[0] && ! $escaped ) {
				$usage_agent_findings[] = "$path:{$t[2]}: prints {$t[1]} unescaped";
			}
		}
	}
}

foreach ( $usage_agent_findings as $usage_agent_finding ) {
	fwrite( STDERR, $usage_agent_finding . "\n" );
}
exit( array() === $usage_agent_findings ? 0 : 1 );
