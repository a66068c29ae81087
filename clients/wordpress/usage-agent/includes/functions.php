<?php
/**
 * The plugin's public functions, for other plugins and themes.
 *
 * @package UsageAgent
 */

defined( 'ABSPATH' ) || exit;

if ( ! function_exists( 'usage_agent_record' ) ) {
	/**
	 * Records one AI call with the agent (fields of its local API: `model`,
	 * `prompt_tokens`, `completion_tokens`, and optionally `cached_tokens`,
	 * `cache_write_tokens`, `reasoning_tokens`, `user_id`, `source`, `origin`, `hold_id`,
	 * `context`, `created_at`, `event_id`). Returns true when the agent took it or it waits
	 * in the spool; false when it is invalid. Never throws.
	 *
	 * @param array $event The event.
	 */
	function usage_agent_record( array $event ): bool {
		return Usage_Agent_Recorder::record( $event );
	}
}

if ( ! function_exists( 'usage_agent_allowed' ) ) {
	/**
	 * Whether a user (the current one when 0) may spend `$tokens` more tokens under the
	 * agent's local limits.
	 *
	 * @param int $user_id The user.
	 * @param int $tokens  Tokens about to be spent.
	 */
	function usage_agent_allowed( int $user_id = 0, int $tokens = 0 ): bool {
		return Usage_Agent_Limits::allowed( $user_id, $tokens );
	}
}
