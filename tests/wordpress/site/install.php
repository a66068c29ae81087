<?php
/**
 * Test-only: installs WordPress in a site directory, activates the plugins under test and
 * creates the test's users. Usage: php install.php <site-dir> <url>. Prints the users' ids
 * as JSON.
 *
 * @package UsageAgentTests
 */

$ua_site = $argv[1];
$ua_url  = $argv[2];
$ua_host = (string) parse_url( $ua_url, PHP_URL_HOST ) . ':' . (string) parse_url( $ua_url, PHP_URL_PORT );

$_SERVER['HTTP_HOST']   = $ua_host;
$_SERVER['REQUEST_URI'] = '/';
define( 'WP_INSTALLING', true );
require $ua_site . '/wp-load.php';
require_once ABSPATH . 'wp-admin/includes/upgrade.php';
require_once ABSPATH . 'wp-admin/includes/plugin.php';

$ua_installed = wp_install( 'Usage Agent test site', 'admin', 'admin@example.com', true, '', 'admin-password' );
update_option( 'siteurl', $ua_url );
update_option( 'home', $ua_url );
// No avatars: Gravatar is out of reach, and a browser would wait for it.
update_option( 'show_avatars', 0 );

$ua_users = array( 'admin' => (int) $ua_installed['user_id'] );
$ua_new   = array(
	'editor'     => array( 'editor', 'Ed Itor' ),
	'author'     => array( 'author', 'Arthur Author' ),
	// A display name carrying an HTML payload: every page must print it escaped.
	'subscriber' => array( 'subscriber', '"><img src=x onerror=alert(1)><script>alert("ua-xss")</script>Sue' ),
);
foreach ( $ua_new as $ua_login => $ua_user ) {
	$ua_id = wp_insert_user(
		array(
			'user_login'   => $ua_login,
			'user_pass'    => $ua_login . '-password',
			'user_email'   => $ua_login . '@example.com',
			'role'         => $ua_user[0],
			'display_name' => $ua_user[1],
		)
	);
	if ( is_wp_error( $ua_id ) ) {
		fwrite( STDERR, $ua_id->get_error_message() . "\n" );
		exit( 1 );
	}
	// Stored as it is: WordPress's own filters would strip the payload on the way in, and the
	// plugin must not rely on that.
	$GLOBALS['wpdb']->update( $GLOBALS['wpdb']->users, array( 'display_name' => $ua_user[1] ), array( 'ID' => $ua_id ) );
	clean_user_cache( $ua_id );
	$ua_users[ $ua_login ] = (int) $ua_id;
}

foreach ( array( 'usage-agent/usage-agent.php', 'alt-text-bot/alt-text-bot.php', 'post-summarizer/post-summarizer.php' ) as $ua_plugin ) {
	$ua_result = activate_plugin( $ua_plugin );
	if ( is_wp_error( $ua_result ) ) {
		fwrite( STDERR, $ua_plugin . ': ' . $ua_result->get_error_message() . "\n" );
		exit( 1 );
	}
}
switch_theme( 'ua-test-theme' );
echo wp_json_encode( $ua_users );
