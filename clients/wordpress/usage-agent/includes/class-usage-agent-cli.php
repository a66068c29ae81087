<?php
/**
 * WP-CLI: `wp usage-agent status|sync|retry-failed|flush-spool|usage`.
 *
 * Loaded only where WP-CLI runs. Output goes through WP_CLI's own methods; `--format=json`
 * prints the agent's answer as it came.
 *
 * @package UsageAgent
 */

defined( 'ABSPATH' ) || exit;

/**
 * Reads and drives the local usage agent.
 */
class Usage_Agent_CLI {

	/**
	 * Shows the agent's sync status and the spool's length.
	 *
	 * ## OPTIONS
	 *
	 * [--format=<format>]
	 * : `table` (the default) or `json`.
	 *
	 * @param array $args       Positional arguments.
	 * @param array $assoc_args Named arguments.
	 */
	public function status( $args, $assoc_args ) {
		$status = $this->call( 'GET', '/v1/status' );
		$status['spooled_events'] = Usage_Agent_Spool::count();
		if ( $this->wants_json( $assoc_args ) ) {
			WP_CLI::line( (string) wp_json_encode( $status ) );
			return;
		}
		foreach ( array( 'status', 'pending_events', 'failed_events', 'synced_events', 'last_sync', 'spooled_events' ) as $key ) {
			WP_CLI::line( sprintf( '%-16s %s', $key, $this->text( $status[ $key ] ?? null ) ) );
		}
		if ( ! empty( $status['last_error'] ) ) {
			WP_CLI::line( sprintf( '%-16s %s', 'last_error', $this->text( $status['last_error'] ) ) );
		}
	}

	/**
	 * Runs a sync now and waits for it.
	 *
	 * @param array $args       Positional arguments.
	 * @param array $assoc_args Named arguments.
	 */
	public function sync( $args, $assoc_args ) {
		$outcome = $this->call( 'POST', '/v1/sync', 300000 );
		if ( ! empty( $outcome['error'] ) ) {
			WP_CLI::error( sprintf( 'sync failed: %s', $this->text( $outcome['error'] ) ) );
		}
		WP_CLI::success( sprintf( 'sync done: %d sent, %d accepted, %d duplicates, %d rejected', (int) ( $outcome['sent'] ?? 0 ), (int) ( $outcome['accepted'] ?? 0 ), (int) ( $outcome['duplicates'] ?? 0 ), (int) ( $outcome['rejected'] ?? 0 ) ) );
	}

	/**
	 * Queues the events the backend refused again.
	 *
	 * @subcommand retry-failed
	 *
	 * @param array $args       Positional arguments.
	 * @param array $assoc_args Named arguments.
	 */
	public function retry_failed( $args, $assoc_args ) {
		$outcome = $this->call( 'POST', '/v1/retry-failed' );
		WP_CLI::success( sprintf( '%d failed events queued again', (int) ( $outcome['requeued'] ?? 0 ) ) );
	}

	/**
	 * Sends the spooled events to the agent now.
	 *
	 * @subcommand flush-spool
	 *
	 * @param array $args       Positional arguments.
	 * @param array $assoc_args Named arguments.
	 */
	public function flush_spool( $args, $assoc_args ) {
		$outcome = Usage_Agent_Spool::flush();
		if ( $outcome['locked'] ) {
			WP_CLI::warning( 'another flush is running' );
			return;
		}
		$message = sprintf( '%d sent, %d set aside as refused, %d left', $outcome['sent'], $outcome['rejected'], $outcome['remaining'] );
		if ( '' !== $outcome['error'] ) {
			WP_CLI::error( sprintf( 'flush stopped (%s): %s', $outcome['error'], $message ) );
		}
		WP_CLI::success( $message );
	}

	/**
	 * Shows token usage from the agent.
	 *
	 * ## OPTIONS
	 *
	 * [--from=<date>]
	 * : First day, YYYY-MM-DD (default: 29 days ago).
	 *
	 * [--to=<date>]
	 * : Last day, YYYY-MM-DD.
	 *
	 * [--group-by=<fields>]
	 * : Any of day,user,source,model,origin (default: day).
	 *
	 * [--user=<id>]
	 * : Only this user's usage.
	 *
	 * [--format=<format>]
	 * : `table` (the default) or `json`.
	 *
	 * @param array $args       Positional arguments.
	 * @param array $assoc_args Named arguments.
	 */
	public function usage( $args, $assoc_args ) {
		$query = array(
			'from'     => $assoc_args['from'] ?? wp_date( 'Y-m-d', time() - 29 * DAY_IN_SECONDS ),
			'group_by' => $assoc_args['group-by'] ?? 'day',
		);
		if ( isset( $assoc_args['to'] ) ) {
			$query['to'] = $assoc_args['to'];
		}
		if ( isset( $assoc_args['user'] ) ) {
			$query['user_id'] = (int) $assoc_args['user'];
		}
		$usage = $this->call( 'GET', '/v1/usage?' . http_build_query( $query ) );
		if ( $this->wants_json( $assoc_args ) ) {
			WP_CLI::line( (string) wp_json_encode( $usage ) );
			return;
		}
		$groups = array_map( 'trim', explode( ',', (string) $query['group_by'] ) );
		$keys   = array();
		foreach ( $groups as $group ) {
			$keys[] = 'user' === $group ? 'user_id' : $group;
		}
		$keys = array_merge( $keys, array( 'events', 'prompt_tokens', 'completion_tokens', 'total_tokens' ) );
		WP_CLI::line( implode( "\t", $keys ) );
		foreach ( (array) ( $usage['rows'] ?? array() ) as $row ) {
			$cells = array();
			foreach ( $keys as $key ) {
				$cells[] = $this->text( $row[ $key ] ?? null );
			}
			WP_CLI::line( implode( "\t", $cells ) );
		}
		WP_CLI::line( sprintf( 'total_tokens %d', (int) ( $usage['totals']['total_tokens'] ?? 0 ) ) );
	}

	/**
	 * One request to the agent; ends the command with an error when it does not answer.
	 *
	 * @param string $method     HTTP method.
	 * @param string $path       Path and query.
	 * @param int    $timeout_ms Timeout; the read timeout when 0.
	 */
	private function call( string $method, string $path, int $timeout_ms = 0 ): array {
		$answer = Usage_Agent_Client::read( $method, $path, null, $timeout_ms );
		$body   = Usage_Agent_Client::ok_body( $answer );
		if ( null === $body ) {
			if ( null === $answer ) {
				WP_CLI::error( sprintf( 'the usage agent does not answer on %s', Usage_Agent_Client::socket_path() ) );
			}
			WP_CLI::error( sprintf( 'the usage agent answered %d: %s', $answer['status'], $answer['body']['error']['message'] ?? '' ) );
		}
		return $body;
	}

	/**
	 * Whether `--format=json` was asked for.
	 *
	 * @param array $assoc_args Named arguments.
	 */
	private function wants_json( $assoc_args ): bool {
		return isset( $assoc_args['format'] ) && 'json' === $assoc_args['format'];
	}

	/**
	 * A value as one line of text.
	 *
	 * @param mixed $value A scalar, null or an array.
	 */
	private function text( $value ): string {
		if ( null === $value ) {
			return '-';
		}
		if ( is_bool( $value ) ) {
			return $value ? 'true' : 'false';
		}
		return is_scalar( $value ) ? (string) $value : (string) wp_json_encode( $value );
	}
}
