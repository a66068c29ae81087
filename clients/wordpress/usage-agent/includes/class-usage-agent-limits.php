<?php
/**
 * Limits: asks the agent's local quotas whether a user may spend more tokens.
 *
 * With the option `usage_agent_enforce` on, the AI client's filter
 * `wp_ai_client_prevent_prompt` stops the call of a user who is over a limit. When the agent
 * does not answer, the option `usage_agent_fail_closed` (off by default) decides: off lets
 * the call through, on stops it.
 *
 * @package UsageAgent
 */

defined( 'ABSPATH' ) || exit;

/**
 * Quota checks.
 */
final class Usage_Agent_Limits {

	/**
	 * Hooks enforcement into the AI client.
	 */
	public static function register(): void {
		add_filter( 'wp_ai_client_prevent_prompt', array( __CLASS__, 'prevent_prompt' ), 10, 1 );
	}

	/**
	 * The agent's quota answer for a user, or null when it does not answer.
	 *
	 * @param int $user_id The user; 0 for none.
	 * @param int $tokens  Tokens about to be spent.
	 */
	public static function quota( int $user_id, int $tokens = 0 ): ?array {
		$path = '/v1/quota?' . http_build_query(
			array(
				'user_id' => max( 0, $user_id ),
				'tokens'  => max( 0, $tokens ),
			)
		);
		return Usage_Agent_Client::ok_body( Usage_Agent_Client::within_budget( 'GET', $path, null ) );
	}

	/**
	 * Whether a user may spend `$tokens` more tokens now.
	 *
	 * @param int $user_id The user; the current user when 0.
	 * @param int $tokens  Tokens about to be spent.
	 */
	public static function allowed( int $user_id = 0, int $tokens = 0 ): bool {
		try {
			if ( 0 === $user_id ) {
				$user_id = get_current_user_id();
			}
			$quota = self::quota( $user_id, $tokens );
			if ( null === $quota || ! isset( $quota['allowed'] ) ) {
				return ! get_option( 'usage_agent_fail_closed', '' );
			}
			return (bool) $quota['allowed'];
		} catch ( Throwable $error ) {
			return ! get_option( 'usage_agent_fail_closed', '' );
		}
	}

	/**
	 * The filter `wp_ai_client_prevent_prompt`.
	 *
	 * @param mixed $prevent Whether something already prevents the prompt.
	 * @return mixed
	 */
	public static function prevent_prompt( $prevent ) {
		if ( $prevent || ! get_option( 'usage_agent_enforce', '' ) ) {
			return $prevent;
		}
		return ! self::allowed( get_current_user_id() );
	}
}
