<?php
/**
 * The Site Health test `usage_agent`: can the site reach its agent, and is the agent well.
 *
 * `good` when the agent is healthy, pending or has sync switched off; `recommended` when it
 * is degraded, tracking is off or events wait in the spool; `critical` when it is failing
 * or does not answer.
 *
 * @package UsageAgent
 */

defined( 'ABSPATH' ) || exit;

/**
 * The Site Health test.
 */
final class Usage_Agent_Site_Health {

	/**
	 * Adds the test to Site Health.
	 */
	public static function register(): void {
		add_filter( 'site_status_tests', array( __CLASS__, 'add_test' ) );
	}

	/**
	 * The `site_status_tests` filter.
	 *
	 * @param array $tests Site Health's tests.
	 */
	public static function add_test( $tests ): array {
		$tests                           = is_array( $tests ) ? $tests : array();
		$tests['direct']['usage_agent'] = array(
			'label' => __( 'AI usage metering', 'usage-agent' ),
			'test'  => array( __CLASS__, 'run' ),
		);
		return $tests;
	}

	/**
	 * Runs the test.
	 */
	public static function run(): array {
		$answer = Usage_Agent_Client::read( 'GET', '/v1/status', null, 1000 );
		$status = Usage_Agent_Client::ok_body( $answer );
		$spool  = Usage_Agent_Spool::count();
		$link   = sprintf(
			'<p><a href="%s">%s</a></p>',
			esc_url( admin_url( 'tools.php?page=usage-agent' ) ),
			esc_html__( 'Open AI usage', 'usage-agent' )
		);
		if ( null === $status ) {
			return self::result(
				'critical',
				__( 'The usage agent does not answer', 'usage-agent' ),
				sprintf(
					/* translators: %s: path of the agent's socket. */
					__( 'AI calls are kept in the spool until the agent at %s answers again. Check that the usage-agent service runs and that the web server may open its socket (socket_group).', 'usage-agent' ),
					Usage_Agent_Client::socket_path()
				),
				$link
			);
		}
		$state = isset( $status['status'] ) ? (string) $status['status'] : '';
		if ( 'failing' === $state ) {
			$message = isset( $status['last_error']['message'] ) ? (string) $status['last_error']['message'] : '';
			return self::result(
				'critical',
				__( 'The usage agent cannot sync its usage', 'usage-agent' ),
				sprintf(
					/* translators: %s: the agent's last sync error. */
					__( 'Its syncs keep failing: %s', 'usage-agent' ),
					$message
				),
				$link
			);
		}
		if ( 'degraded' === $state ) {
			return self::result(
				'recommended',
				__( 'The usage agent is degraded', 'usage-agent' ),
				__( 'Its last sync failed, some events were refused by the backend, or events wait longer than they should.', 'usage-agent' ),
				$link
			);
		}
		if ( isset( $status['tracking_enabled'] ) && ! $status['tracking_enabled'] ) {
			return self::result(
				'recommended',
				__( 'AI usage tracking is switched off', 'usage-agent' ),
				__( 'The usage agent answers but does not store AI calls.', 'usage-agent' ),
				$link
			);
		}
		if ( $spool > 0 ) {
			return self::result(
				'recommended',
				__( 'AI calls wait in the spool', 'usage-agent' ),
				sprintf(
					/* translators: %d: number of spooled events. */
					_n( '%d event waits to be sent to the usage agent.', '%d events wait to be sent to the usage agent.', $spool, 'usage-agent' ),
					$spool
				),
				$link
			);
		}
		return self::result(
			'good',
			__( 'AI usage is metered', 'usage-agent' ),
			__( 'The usage agent answers and records every AI call of the site.', 'usage-agent' ),
			$link
		);
	}

	/**
	 * One Site Health result.
	 *
	 * @param string $status      `good`, `recommended` or `critical`.
	 * @param string $label       The headline.
	 * @param string $description Plain text; escaped here.
	 * @param string $actions     Safe HTML.
	 */
	private static function result( string $status, string $label, string $description, string $actions ): array {
		return array(
			'label'       => $label,
			'status'      => $status,
			'badge'       => array(
				'label' => __( 'Performance', 'usage-agent' ),
				'color' => 'good' === $status ? 'blue' : ( 'critical' === $status ? 'red' : 'orange' ),
			),
			'description' => '<p>' . esc_html( $description ) . '</p>',
			'actions'     => $actions,
			'test'        => 'usage_agent',
		);
	}
}
