<?php
/**
 * Plugin Name: Alt Text Bot (test)
 * Description: Test-only: calls the fake AI provider from its own code, so its calls are `plugin:alt-text-bot`.
 *
 * @package UsageAgentTests
 */

defined( 'ABSPATH' ) || exit;

// A call from WP-cron: the plugin's scheduled job.
add_action(
	'alt_text_bot_cron',
	function () {
		list( $url, $args ) = ua_test_request( 'openai_embeddings' );
		wp_remote_post( $url, $args );
	}
);

add_action(
	'wp_loaded',
	function () {
		if ( ! isset( $_GET['alt_text_bot'] ) ) {
			return;
		}
		list( $url, $args ) = ua_test_request( (string) $_GET['alt_text_bot'] );
		$started  = microtime( true );
		$response = wp_remote_post( $url, $args );
		$body     = json_decode( wp_remote_retrieve_body( $response ), true );
		if ( isset( $_GET['ai_client'] ) ) {
			// The same call seen again by the AI client's action, as when the AI client made it.
			ua_test_fire_ai_client( (string) $body['id'], (string) $body['model'], (int) $body['usage']['prompt_tokens'], (int) $body['usage']['completion_tokens'], null );
		}
		header( 'Content-Type: application/json' );
		echo wp_json_encode(
			array(
				'status' => wp_remote_retrieve_response_code( $response ),
				'ms'     => ( microtime( true ) - $started ) * 1000,
			)
		);
		exit;
	}
);
