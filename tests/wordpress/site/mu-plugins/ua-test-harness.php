<?php
/**
 * Test-only must-use plugin (never shipped): drives the usage-agent plugin from the test.
 *
 * - points `usage_agent_provider_endpoints` at the test's fake AI provider (UA_TEST_PROVIDER),
 *   with a decoy shorter prefix so only the longest prefix gives the right numbers;
 * - `?ua_test=cookies&as=<login>` answers the auth cookies of a user, and
 *   `?ua_test=login&as=<login>&to=<path>` sets them and redirects (for Chromium);
 * - `?ua_test=ai_client&...` fires `wp_ai_client_after_generate_result` with objects of the
 *   AI client's shape (the AI client is not in WordPress 6.1);
 * - `?ua_test=site_health`, `?ua_test=cli&cmd=...` (with a stand-in WP_CLI class that
 *   records what the command prints), `?ua_test=flush`, `?ua_test=spool`;
 * - logs each final origin to UA_TEST_ORIGIN_LOG.
 *
 * @package UsageAgentTests
 */

defined( 'ABSPATH' ) || exit;

/** A request to the fake provider for one API: [url, body]. */
function ua_test_request( string $api ): array {
	$base   = UA_TEST_PROVIDER;
	$routes = array(
		'openai_chat'        => array( '/v1/chat/completions', 'gpt-4o-mini' ),
		'openai_responses'   => array( '/v1/responses', 'gpt-5-mini' ),
		'openai_embeddings'  => array( '/v1/embeddings', 'text-embedding-3-small' ),
		'anthropic_messages' => array( '/v1/messages', 'claude-sonnet-4-5' ),
		'gemini'             => array( '/v1beta/models/gemini-2.5-flash:generateContent', '' ),
		'openrouter_chat'    => array( '/openrouter/api/v1/chat/completions', 'meta-llama/llama-3.3-70b-instruct' ),
		'error'              => array( '/v1/chat/completions', 'error-model' ),
		'unmetered'          => array( '/elsewhere/v1/chat/completions', 'gpt-4o-mini' ),
	);
	$route  = $routes[ $api ];
	$body   = '' === $route[1] ? array( 'contents' => array() ) : array( 'model' => $route[1] );
	return array( $base . $route[0], array(
		'body'    => wp_json_encode( $body ),
		'headers' => array( 'Content-Type' => 'application/json' ),
		'timeout' => 5,
	) );
}

add_filter(
	'usage_agent_provider_endpoints',
	function () {
		$base = UA_TEST_PROVIDER;
		return array(
			array( 'prefix' => $base . '/v1', 'api' => 'openai_embeddings' ),
			array( 'prefix' => $base . '/v1/chat/completions', 'api' => 'openai_chat' ),
			array( 'prefix' => $base . '/v1/responses', 'api' => 'openai_responses' ),
			array( 'prefix' => $base . '/v1/embeddings', 'api' => 'openai_embeddings' ),
			array( 'prefix' => $base . '/v1/messages', 'api' => 'anthropic_messages' ),
			array( 'prefix' => $base . '/v1beta/models/', 'api' => 'gemini' ),
			array( 'prefix' => $base . '/openrouter/api/v1/chat/completions', 'api' => 'openrouter_chat' ),
		);
	}
);

add_filter(
	'usage_agent_origin',
	function ( $origin ) {
		if ( defined( 'UA_TEST_ORIGIN_LOG' ) ) {
			file_put_contents( UA_TEST_ORIGIN_LOG, $origin . "\n", FILE_APPEND | LOCK_EX );
		}
		return $origin;
	},
	PHP_INT_MAX
);

/** The AI client's token usage (WordPress\AiClient\Results\DTO\TokenUsage). */
class UA_Test_Token_Usage {
	private $p, $c, $t;
	public function __construct( int $p, int $c, ?int $t ) { $this->p = $p; $this->c = $c; $this->t = $t; }
	public function getPromptTokens(): int { return $this->p; }
	public function getCompletionTokens(): int { return $this->c; }
	public function getTotalTokens(): int { return $this->p + $this->c; }
	public function getThoughtTokens(): ?int { return $this->t; }
}
/** The AI client's result (GenerativeAiResult). */
class UA_Test_Result {
	private $id, $usage;
	public function __construct( string $id, UA_Test_Token_Usage $usage ) { $this->id = $id; $this->usage = $usage; }
	public function getId(): string { return $this->id; }
	public function getTokenUsage(): UA_Test_Token_Usage { return $this->usage; }
}
/** Model metadata and a model (ModelInterface::metadata()->getId()). */
class UA_Test_Model_Metadata {
	private $id;
	public function __construct( string $id ) { $this->id = $id; }
	public function getId(): string { return $this->id; }
}
class UA_Test_Model {
	private $id;
	public function __construct( string $id ) { $this->id = $id; }
	public function metadata(): UA_Test_Model_Metadata { return new UA_Test_Model_Metadata( $this->id ); }
}
/** The event of `wp_ai_client_after_generate_result` (AfterGenerateResultEvent). */
class UA_Test_After_Event {
	private $result, $model;
	public function __construct( UA_Test_Result $result, UA_Test_Model $model ) { $this->result = $result; $this->model = $model; }
	public function getResult(): UA_Test_Result { return $this->result; }
	public function getModel(): UA_Test_Model { return $this->model; }
}

/** Fires the AI client's action for one result. */
function ua_test_fire_ai_client( string $id, string $model, int $prompt, int $completion, ?int $thoughts ): void {
	do_action(
		'wp_ai_client_after_generate_result',
		new UA_Test_After_Event( new UA_Test_Result( $id, new UA_Test_Token_Usage( $prompt, $completion, $thoughts ) ), new UA_Test_Model( $model ) )
	);
}

/** Answers JSON and ends the request. */
function ua_test_answer( $value ): void {
	header( 'Content-Type: application/json' );
	echo wp_json_encode( $value );
	exit;
}

add_action(
	'plugins_loaded',
	function () {
		if ( empty( $_GET['ua_test'] ) ) {
			return;
		}
		$action = (string) $_GET['ua_test'];
		if ( 'cookies' === $action || 'login' === $action ) {
			$user = get_user_by( 'login', (string) $_GET['as'] );
			if ( ! $user ) {
				status_header( 404 );
				ua_test_answer( array( 'error' => 'no such user' ) );
			}
			if ( 'login' === $action ) {
				wp_set_auth_cookie( $user->ID, false, false );
				wp_safe_redirect( home_url( (string) $_GET['to'] ) );
				exit;
			}
			$expiry = time() + DAY_IN_SECONDS;
			$token  = WP_Session_Tokens::get_instance( $user->ID )->create( $expiry );
			ua_test_answer(
				array(
					'cookie' => AUTH_COOKIE . '=' . wp_generate_auth_cookie( $user->ID, $expiry, 'auth', $token ) . '; '
						. LOGGED_IN_COOKIE . '=' . wp_generate_auth_cookie( $user->ID, $expiry, 'logged_in', $token ),
					'id'     => $user->ID,
				)
			);
		}
	},
	1
);

add_action(
	'wp_loaded',
	function () {
		if ( empty( $_GET['ua_test'] ) ) {
			return;
		}
		$action = (string) $_GET['ua_test'];
		switch ( $action ) {
			case 'ai_client':
				$thoughts = isset( $_GET['thoughts'] ) ? (int) $_GET['thoughts'] : null;
				ua_test_fire_ai_client( (string) $_GET['id'], (string) $_GET['model'], (int) $_GET['prompt'], (int) $_GET['completion'], $thoughts );
				ua_test_answer( array( 'ok' => true ) );
				break;
			case 'record':
				$started = microtime( true );
				$results = array();
				$count   = isset( $_GET['count'] ) ? (int) $_GET['count'] : 1;
				for ( $i = 0; $i < $count; $i++ ) {
					$results[] = usage_agent_record(
						array(
							'model'             => isset( $_GET['model'] ) ? (string) $_GET['model'] : 'manual-model',
							'prompt_tokens'     => 10,
							'completion_tokens' => 5,
							'context'           => array( 'n' => $i ),
						)
					);
				}
				ua_test_answer(
					array(
						'results' => $results,
						'ms'      => ( microtime( true ) - $started ) * 1000,
						'spool'   => Usage_Agent_Spool::count(),
					)
				);
				break;
			case 'record_action':
				do_action( 'usage_agent_record', array( 'model' => 'action-model', 'prompt_tokens' => 7, 'completion_tokens' => 3 ) );
				ua_test_answer( array( 'ok' => true ) );
				break;
			case 'site_health':
				require_once ABSPATH . 'wp-admin/includes/class-wp-site-health.php';
				$tests = WP_Site_Health::get_tests();
				ua_test_answer( call_user_func( $tests['direct']['usage_agent']['test'] ) );
				break;
			case 'flush':
				do_action( 'usage_agent_flush_spool' );
				ua_test_answer( array( 'spool' => Usage_Agent_Spool::count() ) );
				break;
			case 'make_due':
				// The spool's flush due now, so the next wp-cron.php run takes it.
				$next = wp_next_scheduled( 'usage_agent_flush_spool' );
				wp_unschedule_event( $next, 'usage_agent_flush_spool' );
				wp_schedule_event( time() - 1, 'usage_agent_every_minute', 'usage_agent_flush_spool' );
				ua_test_answer( array( 'was' => $next ) );
				break;
			case 'allowed':
				ua_test_answer(
					array(
						'allowed' => usage_agent_allowed( (int) $_GET['user'], isset( $_GET['tokens'] ) ? (int) $_GET['tokens'] : 0 ),
						'prevent' => apply_filters( 'wp_ai_client_prevent_prompt', false, null ),
					)
				);
				break;
			case 'uninstall':
				// What deleting the plugin under Plugins does: deactivate, then uninstall.
				require_once ABSPATH . 'wp-admin/includes/plugin.php';
				deactivate_plugins( 'usage-agent/usage-agent.php' );
				uninstall_plugin( 'usage-agent/usage-agent.php' );
				$left = array();
				foreach ( array( 'usage_agent_socket', 'usage_agent_capture_http', 'usage_agent_enforce', 'usage_agent_fail_closed' ) as $name ) {
					if ( false !== get_option( $name ) ) {
						$left[] = $name;
					}
				}
				ua_test_answer(
					array(
						'options_left' => $left,
						'spool_exists' => file_exists( Usage_Agent_Spool::dir() ),
						'scheduled'    => wp_next_scheduled( 'usage_agent_flush_spool' ),
					)
				);
				break;
			case 'origin_of':
				// The origin a call stack of these files (innermost first) gets.
				$files = array();
				foreach ( (array) json_decode( wp_unslash( (string) $_GET['files'] ), true ) as $file ) {
					$files[] = str_replace( array( '{abspath}', '{plugins}', '{themes}', '{mu}' ), array( ABSPATH, WP_PLUGIN_DIR, get_theme_root(), WPMU_PLUGIN_DIR ), $file );
				}
				ua_test_answer( array( 'origin' => Usage_Agent_Origin::from_files( $files ) ) );
				break;
			case 'schedule_call':
				wp_schedule_single_event( time() - 1, 'alt_text_bot_cron' );
				ua_test_answer( array( 'ok' => true ) );
				break;
			case 'record_as_cli':
				// What WP-CLI defines before it loads WordPress.
				define( 'WP_CLI', true );
				ua_test_answer( array( 'result' => usage_agent_record( array( 'model' => 'cli-model', 'prompt_tokens' => 1, 'completion_tokens' => 1 ) ) ) );
				break;
			case 'option':
				update_option( (string) $_GET['name'], (string) $_GET['value'] );
				ua_test_answer( array( 'ok' => true ) );
				break;
			case 'spool':
				$dir = Usage_Agent_Spool::dir();
				$modes = array();
				$ids   = array();
				foreach ( (array) glob( $dir . '/*.json' ) as $file ) {
					$modes[] = substr( sprintf( '%o', fileperms( $file ) ), -4 );
					$ids[]   = basename( $file, '.json' );
				}
				ua_test_answer(
					array(
						'dir'       => $dir,
						'count'     => Usage_Agent_Spool::count(),
						'modes'     => $modes,
						'ids'       => $ids,
						'rejected'  => count( (array) glob( $dir . '/*.json.rejected' ) ),
						'dir_mode'  => is_dir( $dir ) ? substr( sprintf( '%o', fileperms( $dir ) ), -4 ) : '',
						'guards'    => file_exists( $dir . '/index.php' ) && file_exists( $dir . '/.htaccess' ),
						'scheduled' => wp_get_schedule( 'usage_agent_flush_spool' ),
						'interval'  => wp_get_schedules()[ (string) wp_get_schedule( 'usage_agent_flush_spool' ) ]['interval'] ?? 0,
					)
				);
				break;
			case 'cli':
				require_once WP_PLUGIN_DIR . '/usage-agent/includes/class-usage-agent-cli.php';
				require_once __DIR__ . '/../ua-test-wp-cli.php';
				ua_test_answer( UA_Test_WP_CLI_Runner::run( (string) $_GET['cmd'], isset( $_GET['args'] ) ? (array) json_decode( wp_unslash( (string) $_GET['args'] ), true ) : array() ) );
				break;
		}
	}
);
