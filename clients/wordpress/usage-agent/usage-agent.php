<?php
/**
 * Plugin Name:       Usage Agent
 * Description:       Meters every AI call on the site (tokens per user, plugin and model) with the local usage-agent, which keeps the log and ships it to your provider.
 * Version:           0.1.0
 * Requires at least: 6.1
 * Requires PHP:      7.4
 * Author:            usage-agent
 * License:           MIT
 * Text Domain:       usage-agent
 * Domain Path:       /languages
 *
 * @package UsageAgent
 */

defined( 'ABSPATH' ) || exit;

define( 'USAGE_AGENT_VERSION', '0.1.0' );
define( 'USAGE_AGENT_FILE', __FILE__ );
define( 'USAGE_AGENT_DIR', __DIR__ . '/' );

require_once USAGE_AGENT_DIR . 'includes/class-usage-agent-client.php';
require_once USAGE_AGENT_DIR . 'includes/class-usage-agent-spool.php';
require_once USAGE_AGENT_DIR . 'includes/class-usage-agent-origin.php';
require_once USAGE_AGENT_DIR . 'includes/class-usage-agent-recorder.php';
require_once USAGE_AGENT_DIR . 'includes/class-usage-agent-capture.php';
require_once USAGE_AGENT_DIR . 'includes/class-usage-agent-limits.php';
require_once USAGE_AGENT_DIR . 'includes/class-usage-agent-site-health.php';
require_once USAGE_AGENT_DIR . 'includes/functions.php';

if ( is_admin() ) {
	require_once USAGE_AGENT_DIR . 'includes/class-usage-agent-admin.php';
	Usage_Agent_Admin::register();
}

if ( defined( 'WP_CLI' ) && WP_CLI ) {
	require_once USAGE_AGENT_DIR . 'includes/class-usage-agent-cli.php';
	WP_CLI::add_command( 'usage-agent', 'Usage_Agent_CLI' );
}

Usage_Agent_Recorder::register();
Usage_Agent_Capture::register();
Usage_Agent_Limits::register();
Usage_Agent_Site_Health::register();

register_activation_hook( __FILE__, array( 'Usage_Agent_Recorder', 'activate' ) );
register_deactivation_hook( __FILE__, array( 'Usage_Agent_Recorder', 'deactivate' ) );

add_action(
	'init',
	static function () {
		load_plugin_textdomain( 'usage-agent', false, dirname( plugin_basename( USAGE_AGENT_FILE ) ) . '/languages' );
	}
);
