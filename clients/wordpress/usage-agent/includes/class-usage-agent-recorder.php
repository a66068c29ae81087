<?php
/**
 * Recording: fills in an event's defaults and hands it to the agent, else to the spool.
 *
 * Defaults: a UUIDv4 `event_id` (made here, so a resend is a duplicate), the current user,
 * the origin from the call stack, and the source from how PHP runs (`bulk` in WP-CLI,
 * `queue` in WP-cron, `inline` otherwise). Recording never throws and never waits longer
 * than the request's budget (see Usage_Agent_Client).
 *
 * @package UsageAgent
 */

defined( 'ABSPATH' ) || exit;

/**
 * Records events and owns the spool's schedule.
 */
final class Usage_Agent_Recorder {

	const CRON_HOOK     = 'usage_agent_flush_spool';
	const CRON_SCHEDULE = 'usage_agent_every_minute';

	/**
	 * Whether a flush of the spool is already planned at the end of this request.
	 *
	 * @var bool
	 */
	private static $flush_planned = false;

	/**
	 * Hooks recording and the spool's schedule into WordPress.
	 */
	public static function register(): void {
		add_action( 'usage_agent_record', array( __CLASS__, 'record' ), 10, 1 );
		add_filter( 'cron_schedules', array( __CLASS__, 'cron_schedules' ) );
		add_action( self::CRON_HOOK, array( __CLASS__, 'flush_from_cron' ) );
		add_action( 'init', array( __CLASS__, 'ensure_scheduled' ) );
	}

	/**
	 * Records one event (the section fields of the agent's local API). Returns true when the
	 * agent took it or it waits in the spool, false when it is invalid or could not be kept.
	 *
	 * @param mixed $event The event.
	 */
	public static function record( $event ): bool {
		try {
			if ( ! is_array( $event ) ) {
				return false;
			}
			$event = self::complete( $event );
			return self::deliver( $event );
		} catch ( Throwable $error ) {
			self::log( 'recording failed: ' . $error->getMessage() );
			return false;
		}
	}

	/**
	 * An event with its defaults filled in.
	 *
	 * @param array $event The event as given.
	 */
	public static function complete( array $event ): array {
		if ( empty( $event['event_id'] ) ) {
			$event['event_id'] = wp_generate_uuid4();
		}
		if ( ! isset( $event['user_id'] ) && ! isset( $event['wp_user_id'] ) ) {
			$event['user_id'] = get_current_user_id();
		}
		if ( empty( $event['source'] ) ) {
			$event['source'] = self::source();
		}
		$origin = isset( $event['origin'] ) && is_string( $event['origin'] ) ? $event['origin'] : Usage_Agent_Origin::detect();
		/**
		 * Filters the origin of an event: what on the site made the AI call.
		 *
		 * @param string $origin `plugin:<slug>`, `theme:<slug>` or `core`.
		 * @param array  $event  The event.
		 */
		$event['origin'] = Usage_Agent_Origin::clean( (string) apply_filters( 'usage_agent_origin', $origin, $event ) );
		return $event;
	}

	/**
	 * The source of a call made now: `bulk`, `queue` or `inline`.
	 */
	public static function source(): string {
		if ( defined( 'WP_CLI' ) && WP_CLI ) {
			return 'bulk';
		}
		if ( wp_doing_cron() ) {
			return 'queue';
		}
		return 'inline';
	}

	/**
	 * Sends an event within the request's budget; spools it when the agent does not answer.
	 *
	 * @param array $event A completed event.
	 */
	private static function deliver( array $event ): bool {
		$answer = Usage_Agent_Client::within_budget( 'POST', '/v1/events', $event );
		if ( null !== $answer && $answer['status'] < 300 ) {
			if ( ! self::$flush_planned && Usage_Agent_Spool::count() > 0 ) {
				self::$flush_planned = true;
				add_action( 'shutdown', array( __CLASS__, 'flush_after_record' ) );
			}
			return true;
		}
		if ( null !== $answer && $answer['status'] < 500 ) {
			// The agent refused this event (invalid, or too large); it would refuse it again
			// from the spool.
			$message = isset( $answer['body']['error']['message'] ) ? $answer['body']['error']['message'] : 'HTTP ' . $answer['status'];
			self::log( 'event refused: ' . $message );
			return false;
		}
		if ( empty( $event['created_at'] ) ) {
			// It happened now, whenever the agent gets it.
			$event['created_at'] = gmdate( 'Y-m-d\TH:i:s\Z' );
		}
		if ( Usage_Agent_Spool::put( $event ) ) {
			return true;
		}
		self::log( 'the agent did not answer and the spool is not writable; event lost' );
		return false;
	}

	/**
	 * The agent answered again: send the spool at the end of this request, within what is
	 * left of its budget (the WP-cron hook sends the rest).
	 */
	public static function flush_after_record(): void {
		$remaining = Usage_Agent_Client::remaining_ms();
		if ( $remaining >= 20 ) {
			Usage_Agent_Spool::flush( $remaining );
		}
	}

	/**
	 * The WP-cron hook `usage_agent_flush_spool`.
	 */
	public static function flush_from_cron(): void {
		Usage_Agent_Spool::flush();
	}

	/**
	 * Adds the every-minute schedule.
	 *
	 * @param array $schedules Schedules known to WP-cron.
	 */
	public static function cron_schedules( $schedules ): array {
		$schedules                        = is_array( $schedules ) ? $schedules : array();
		$schedules[ self::CRON_SCHEDULE ] = array(
			'interval' => MINUTE_IN_SECONDS,
			'display'  => __( 'Every minute (usage-agent spool)', 'usage-agent' ),
		);
		return $schedules;
	}

	/**
	 * Keeps the spool's flush scheduled (after activation, or if something removed it).
	 */
	public static function ensure_scheduled(): void {
		if ( ! wp_next_scheduled( self::CRON_HOOK ) ) {
			wp_schedule_event( time() + MINUTE_IN_SECONDS, self::CRON_SCHEDULE, self::CRON_HOOK );
		}
	}

	/**
	 * Activation: schedules the spool's flush.
	 */
	public static function activate(): void {
		add_filter( 'cron_schedules', array( __CLASS__, 'cron_schedules' ) );
		self::ensure_scheduled();
	}

	/**
	 * Deactivation: stops the schedule; the options and the spool stay.
	 */
	public static function deactivate(): void {
		wp_clear_scheduled_hook( self::CRON_HOOK );
	}

	/**
	 * Logs a problem of metering, never its data.
	 *
	 * @param string $message What went wrong.
	 */
	private static function log( string $message ): void {
		// phpcs:ignore Squiz.PHP.DiscouragedFunctions -- the only channel a site's admin already reads.
		error_log( 'usage-agent: ' . $message );
	}
}
