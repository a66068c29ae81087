<?php
/**
 * The transport: HTTP/1.1 with JSON over the agent's Unix socket, through PHP's curl.
 *
 * Recording shares one time budget per PHP request (USAGE_AGENT_TIMEOUT_MS, 200 ms by
 * default): once it is spent, or once the agent failed to answer, later events of the same
 * request go straight to the spool instead of waiting again. Reads for admin screens have
 * their own, longer timeout. Nothing here throws.
 *
 * @package UsageAgent
 */

defined( 'ABSPATH' ) || exit;

/**
 * Talks to the agent over its socket.
 */
final class Usage_Agent_Client {

	const DEFAULT_SOCKET     = '/run/usage-agent/agent.sock';
	const DEFAULT_TIMEOUT_MS = 200;
	const READ_TIMEOUT_MS    = 2000;

	/**
	 * Milliseconds of the recording budget spent in this PHP request.
	 *
	 * @var float
	 */
	private static $spent_ms = 0.0;

	/**
	 * Whether the agent already failed to answer in this PHP request.
	 *
	 * @var bool
	 */
	private static $unreachable = false;

	/**
	 * The socket path: the constant, else the option, else the systemd default.
	 */
	public static function socket_path(): string {
		if ( defined( 'USAGE_AGENT_SOCKET' ) && is_string( USAGE_AGENT_SOCKET ) && '' !== USAGE_AGENT_SOCKET ) {
			return USAGE_AGENT_SOCKET;
		}
		$option = get_option( 'usage_agent_socket', '' );
		if ( is_string( $option ) && '' !== $option ) {
			return $option;
		}
		return self::DEFAULT_SOCKET;
	}

	/**
	 * The recording budget per PHP request, in milliseconds.
	 */
	public static function timeout_ms(): int {
		if ( defined( 'USAGE_AGENT_TIMEOUT_MS' ) && (int) USAGE_AGENT_TIMEOUT_MS > 0 ) {
			return (int) USAGE_AGENT_TIMEOUT_MS;
		}
		return self::DEFAULT_TIMEOUT_MS;
	}

	/**
	 * What is left of this request's recording budget, in milliseconds (0 when the agent
	 * already failed to answer).
	 */
	public static function remaining_ms(): int {
		if ( self::$unreachable ) {
			return 0;
		}
		return max( 0, (int) floor( self::timeout_ms() - self::$spent_ms ) );
	}

	/**
	 * A request on the recording budget: it never waits longer than what is left of it.
	 *
	 * @param string     $method HTTP method.
	 * @param string     $path   Path and query, e.g. `/v1/events`.
	 * @param array|null $body   JSON body.
	 * @return array|null `['status' => int, 'body' => array|null]`, or null when no answer came.
	 */
	public static function within_budget( string $method, string $path, ?array $body ): ?array {
		$remaining = self::remaining_ms();
		if ( $remaining < 5 ) {
			return null;
		}
		$started = microtime( true );
		$answer  = self::request( $method, $path, $body, $remaining );
		self::$spent_ms += ( microtime( true ) - $started ) * 1000;
		if ( null === $answer || $answer['status'] >= 500 ) {
			self::$unreachable = true;
		}
		return $answer;
	}

	/**
	 * A read for a screen or a command, with the longer read timeout.
	 *
	 * @param string     $method HTTP method.
	 * @param string     $path   Path and query.
	 * @param array|null $body   JSON body.
	 * @param int        $timeout_ms Timeout; the read timeout when 0.
	 * @return array|null `['status' => int, 'body' => array|null]`, or null when no answer came.
	 */
	public static function read( string $method, string $path, ?array $body = null, int $timeout_ms = 0 ): ?array {
		return self::request( $method, $path, $body, $timeout_ms > 0 ? $timeout_ms : max( self::READ_TIMEOUT_MS, self::timeout_ms() ) );
	}

	/**
	 * Decoded JSON of a `2xx` answer, or null.
	 *
	 * @param array|null $answer What request() returned.
	 */
	public static function ok_body( ?array $answer ): ?array {
		if ( null === $answer || $answer['status'] < 200 || $answer['status'] >= 300 ) {
			return null;
		}
		return is_array( $answer['body'] ) ? $answer['body'] : null;
	}

	/**
	 * One HTTP request over the socket.
	 *
	 * @param string     $method     HTTP method.
	 * @param string     $path       Path and query.
	 * @param array|null $body       JSON body.
	 * @param int        $timeout_ms Total timeout, connection included.
	 */
	private static function request( string $method, string $path, ?array $body, int $timeout_ms ): ?array {
		if ( ! function_exists( 'curl_init' ) ) {
			return null;
		}
		$curl = curl_init( 'http://localhost' . $path );
		if ( false === $curl ) {
			return null;
		}
		$options = array(
			CURLOPT_UNIX_SOCKET_PATH  => self::socket_path(),
			CURLOPT_CUSTOMREQUEST     => $method,
			CURLOPT_RETURNTRANSFER    => true,
			CURLOPT_CONNECTTIMEOUT_MS => $timeout_ms,
			CURLOPT_TIMEOUT_MS        => $timeout_ms,
			CURLOPT_NOSIGNAL          => true,
			CURLOPT_HTTPHEADER        => array( 'Content-Type: application/json', 'Expect:' ),
		);
		if ( null !== $body ) {
			$options[ CURLOPT_POSTFIELDS ] = wp_json_encode( $body, JSON_UNESCAPED_SLASHES );
		} elseif ( 'POST' === $method ) {
			$options[ CURLOPT_POSTFIELDS ] = '';
		}
		curl_setopt_array( $curl, $options );
		$raw    = curl_exec( $curl );
		$status = (int) curl_getinfo( $curl, CURLINFO_RESPONSE_CODE );
		curl_close( $curl );
		if ( false === $raw || 0 === $status ) {
			return null;
		}
		$decoded = json_decode( (string) $raw, true );
		return array(
			'status' => $status,
			'body'   => is_array( $decoded ) ? $decoded : null,
		);
	}
}
