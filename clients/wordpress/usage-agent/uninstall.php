<?php
/**
 * Uninstall: removes the plugin's options, its schedule and its spool. The agent keeps the
 * usage it recorded.
 *
 * @package UsageAgent
 */

defined( 'ABSPATH' ) || exit;
defined( 'WP_UNINSTALL_PLUGIN' ) || exit;

require_once __DIR__ . '/includes/class-usage-agent-spool.php';

foreach ( array( 'usage_agent_socket', 'usage_agent_capture_http', 'usage_agent_enforce', 'usage_agent_fail_closed' ) as $usage_agent_option ) {
	delete_option( $usage_agent_option );
}
wp_clear_scheduled_hook( 'usage_agent_flush_spool' );
Usage_Agent_Spool::remove();
