<?php
/**
 * The spool: events the agent did not take, kept on disk until it answers again.
 *
 * One file per event (`<event_id>.json`, mode 0600) in `wp-content/uploads/usage-agent/`,
 * which holds an `index.php` and an `.htaccess` that deny browsers. A flush sends them in
 * batches of at most 1000 and deletes each file only after the agent committed it. Every
 * event keeps the `event_id` it was given when it happened, so one sent twice (two flushes
 * racing, a crash between the answer and the delete) is a `duplicate` at the agent and
 * counts once. Flushes take a non-blocking lock, so two never send the same files at once.
 *
 * @package UsageAgent
 */

defined( 'ABSPATH' ) || exit;

/**
 * The on-disk spool.
 */
final class Usage_Agent_Spool {

	const BATCH       = 1000;
	const MAX_BATCHES = 50;

	/**
	 * The spool directory, without a trailing slash.
	 */
	public static function dir(): string {
		$uploads = wp_upload_dir( null, false );
		return untrailingslashit( wp_normalize_path( $uploads['basedir'] ) ) . '/usage-agent';
	}

	/**
	 * Keeps one event. Returns whether it is on disk.
	 *
	 * @param array $event The event, with its `event_id`.
	 */
	public static function put( array $event ): bool {
		$dir = self::dir();
		if ( ! self::prepare( $dir ) ) {
			return false;
		}
		$id   = preg_replace( '/[^a-f0-9-]/', '', strtolower( (string) $event['event_id'] ) );
		$json = wp_json_encode( $event, JSON_UNESCAPED_SLASHES );
		if ( '' === $id || false === $json ) {
			return false;
		}
		$temporary = $dir . '/.' . $id . '.tmp';
		$previous  = umask( 0077 );
		$written   = file_put_contents( $temporary, $json, LOCK_EX );
		umask( $previous );
		if ( false === $written ) {
			return false;
		}
		chmod( $temporary, 0600 );
		return rename( $temporary, $dir . '/' . $id . '.json' );
	}

	/**
	 * How many events wait in the spool.
	 */
	public static function count(): int {
		$files = glob( self::dir() . '/*.json' );
		return is_array( $files ) ? count( $files ) : 0;
	}

	/**
	 * Sends what the spool holds, batch by batch, until it is empty, the agent stops
	 * answering or the time is up. Returns what happened.
	 *
	 * @param int $timeout_ms Timeout of each batch; the read timeout when 0.
	 * @return array{sent: int, rejected: int, remaining: int, locked: bool, error: string}
	 */
	public static function flush( int $timeout_ms = 0 ): array {
		$outcome = array(
			'sent'      => 0,
			'rejected'  => 0,
			'remaining' => 0,
			'locked'    => false,
			'error'     => '',
		);
		$dir     = self::dir();
		if ( ! is_dir( $dir ) ) {
			return $outcome;
		}
		$lock = fopen( $dir . '/.lock', 'c' );
		if ( false === $lock ) {
			$outcome['error'] = 'lock';
			return $outcome;
		}
		if ( ! flock( $lock, LOCK_EX | LOCK_NB ) ) {
			// Another flush is running; it sends these files.
			fclose( $lock );
			$outcome['locked']    = true;
			$outcome['remaining'] = self::count();
			return $outcome;
		}
		for ( $round = 0; $round < self::MAX_BATCHES; $round++ ) {
			$files = glob( $dir . '/*.json' );
			if ( ! is_array( $files ) || array() === $files ) {
				break;
			}
			sort( $files );
			$files  = array_slice( $files, 0, self::BATCH );
			$events = array();
			foreach ( $files as $index => $file ) {
				$event = json_decode( (string) file_get_contents( $file ), true );
				if ( ! is_array( $event ) ) {
					self::set_aside( $file );
					++$outcome['rejected'];
					unset( $files[ $index ] );
					continue;
				}
				$events[] = $event;
			}
			$files = array_values( $files );
			if ( array() === $events ) {
				continue;
			}
			$answer = Usage_Agent_Client::read( 'POST', '/v1/events', array( 'events' => $events ), $timeout_ms );
			if ( null === $answer || $answer['status'] >= 500 ) {
				$outcome['error'] = null === $answer ? 'unreachable' : 'http ' . $answer['status'];
				break;
			}
			if ( $answer['status'] >= 200 && $answer['status'] < 300 ) {
				foreach ( $files as $file ) {
					wp_delete_file( $file );
				}
				$outcome['sent'] += count( $files );
				continue;
			}
			// The batch is all or nothing: one bad event (or one too large) refused it. Send
			// each alone, so the good ones are kept and only the bad ones are set aside.
			foreach ( $files as $index => $file ) {
				$one = Usage_Agent_Client::read( 'POST', '/v1/events', $events[ $index ], $timeout_ms );
				if ( null === $one || $one['status'] >= 500 ) {
					$outcome['error'] = null === $one ? 'unreachable' : 'http ' . $one['status'];
					break 2;
				}
				if ( $one['status'] < 300 ) {
					wp_delete_file( $file );
					++$outcome['sent'];
				} else {
					self::set_aside( $file );
					++$outcome['rejected'];
				}
			}
		}
		flock( $lock, LOCK_UN );
		fclose( $lock );
		$outcome['remaining'] = self::count();
		return $outcome;
	}

	/**
	 * Removes the spool and everything in it (uninstall).
	 */
	public static function remove(): void {
		$dir = self::dir();
		if ( ! is_dir( $dir ) ) {
			return;
		}
		$files = glob( $dir . '/{,.}*', GLOB_BRACE );
		foreach ( is_array( $files ) ? $files : array() as $file ) {
			if ( is_file( $file ) ) {
				wp_delete_file( $file );
			}
		}
		rmdir( $dir );
	}

	/**
	 * Keeps a file the agent refused out of later flushes, for an admin to look at.
	 *
	 * @param string $file A spooled event.
	 */
	private static function set_aside( string $file ): void {
		rename( $file, $file . '.rejected' );
	}

	/**
	 * Creates the directory, private and never served, once.
	 *
	 * @param string $dir The spool directory.
	 */
	private static function prepare( string $dir ): bool {
		if ( ! is_dir( $dir ) && ! wp_mkdir_p( $dir ) ) {
			return false;
		}
		chmod( $dir, 0700 );
		$guards = array(
			'index.php' => "<?php\n// Silence is golden.\n",
			'.htaccess' => "Require all denied\nDeny from all\n",
		);
		foreach ( $guards as $name => $text ) {
			if ( ! file_exists( $dir . '/' . $name ) ) {
				file_put_contents( $dir . '/' . $name, $text );
			}
		}
		return true;
	}
}
