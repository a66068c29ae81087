<?php
/**
 * Test-only: the theme's own AI call, on `?theme_call=<api>`.
 *
 * @package UsageAgentTests
 */

defined( 'ABSPATH' ) || exit;

add_action(
	'wp_loaded',
	function () {
		if ( ! isset( $_GET['theme_call'] ) ) {
			return;
		}
		list( $url, $args ) = ua_test_request( (string) $_GET['theme_call'] );
		$response = wp_remote_post( $url, $args );
		header( 'Content-Type: application/json' );
		echo wp_json_encode( array( 'status' => wp_remote_retrieve_response_code( $response ) ) );
		exit;
	}
);
