<?php
/**
 * Automatic metering: WordPress's AI client and HTTP answers of known AI APIs.
 *
 * The AI client's action `wp_ai_client_after_generate_result` gives prompt, completion and
 * thought tokens; the `http_response` filter reads the usage of a `wp_remote_*` answer from
 * an AI API by the table in usage_from_answer(). The AI client makes its own HTTP request,
 * so one call can pass both hooks: the HTTP capture comes first and wins (it knows cached
 * and cache-write tokens), and the AI client's event with the same provider response id is
 * dropped.
 *
 * @package UsageAgent
 */

defined( 'ABSPATH' ) || exit;

/**
 * The two automatic hooks.
 */
final class Usage_Agent_Capture {

	/**
	 * Provider response ids the HTTP capture recorded in this PHP request.
	 *
	 * @var array<string, true>
	 */
	private static $captured_ids = array();

	/**
	 * Hooks both captures into WordPress.
	 */
	public static function register(): void {
		add_filter( 'http_response', array( __CLASS__, 'on_http_response' ), 10, 3 );
		add_action( 'wp_ai_client_after_generate_result', array( __CLASS__, 'on_ai_client_result' ), 10, 1 );
	}

	/**
	 * The providers' public endpoints, by API name, after the `usage_agent_provider_endpoints`
	 * filter.
	 *
	 * @return array<int, array{prefix: string, api: string}>
	 */
	public static function endpoints(): array {
		$defaults = array(
			array(
				'prefix' => 'https://api.openai.com/v1/chat/completions',
				'api'    => 'openai_chat',
			),
			array(
				'prefix' => 'https://api.openai.com/v1/responses',
				'api'    => 'openai_responses',
			),
			array(
				'prefix' => 'https://api.openai.com/v1/embeddings',
				'api'    => 'openai_embeddings',
			),
			array(
				'prefix' => 'https://api.anthropic.com/v1/messages',
				'api'    => 'anthropic_messages',
			),
			array(
				'prefix' => 'https://generativelanguage.googleapis.com/v1beta/models/',
				'api'    => 'gemini',
			),
			array(
				'prefix' => 'https://generativelanguage.googleapis.com/v1/models/',
				'api'    => 'gemini',
			),
			array(
				'prefix' => 'https://openrouter.ai/api/v1/chat/completions',
				'api'    => 'openrouter_chat',
			),
		);
		/**
		 * Filters the AI APIs whose answers are metered: a list of
		 * `['prefix' => URL prefix, 'api' => name]`. A request matches the longest prefix of
		 * its URL.
		 *
		 * @param array $endpoints The known endpoints.
		 */
		$endpoints = apply_filters( 'usage_agent_provider_endpoints', $defaults );
		return is_array( $endpoints ) ? $endpoints : $defaults;
	}

	/**
	 * The API a URL belongs to (the longest matching prefix), or null.
	 *
	 * @param string $url A request URL.
	 */
	public static function api_for_url( string $url ): ?string {
		$best  = null;
		$width = -1;
		foreach ( self::endpoints() as $endpoint ) {
			if ( ! is_array( $endpoint ) || empty( $endpoint['prefix'] ) || empty( $endpoint['api'] ) ) {
				continue;
			}
			$prefix = (string) $endpoint['prefix'];
			if ( 0 === strpos( $url, $prefix ) && strlen( $prefix ) > $width ) {
				$best  = (string) $endpoint['api'];
				$width = strlen( $prefix );
			}
		}
		return $best;
	}

	/**
	 * The `http_response` filter: meters an AI API's answer, and returns it unchanged.
	 *
	 * @param mixed  $response    The answer, an array or a WP_Error.
	 * @param array  $parsed_args The request's arguments.
	 * @param string $url         The request URL.
	 * @return mixed
	 */
	public static function on_http_response( $response, $parsed_args, $url ) {
		try {
			if ( ! get_option( 'usage_agent_capture_http', '1' ) || ! is_array( $response ) || ! is_string( $url ) ) {
				return $response;
			}
			$api = self::api_for_url( $url );
			if ( null === $api ) {
				return $response;
			}
			$code = (int) wp_remote_retrieve_response_code( $response );
			if ( $code < 200 || $code >= 300 ) {
				return $response;
			}
			$answer = json_decode( (string) wp_remote_retrieve_body( $response ), true );
			if ( ! is_array( $answer ) ) {
				return $response;
			}
			$usage = self::usage_from_answer( $api, $answer );
			if ( null === $usage ) {
				return $response;
			}
			$model = self::model( $api, $answer, is_array( $parsed_args ) ? $parsed_args : array(), $url );
			if ( '' === $model ) {
				return $response;
			}
			$id = self::response_id( $answer );
			if ( '' !== $id ) {
				self::$captured_ids[ $id ] = true;
			}
			Usage_Agent_Recorder::record( array( 'model' => $model ) + $usage );
		} catch ( Throwable $error ) {
			// Metering never breaks the request it watches.
			return $response;
		}
		return $response;
	}

	/**
	 * Our token fields from an API's answer, or null when it carries no usage. Our
	 * `prompt_tokens` includes cached and cache-write tokens and our `completion_tokens`
	 * includes reasoning tokens, whatever the provider counts them in.
	 *
	 * @param string $api    The API name.
	 * @param array  $answer The decoded answer.
	 * @return array<string, int>|null
	 */
	public static function usage_from_answer( string $api, array $answer ): ?array {
		switch ( $api ) {
			case 'openai_chat':
			case 'openrouter_chat':
				$usage = self::usage_object( $answer, 'usage', 'prompt_tokens' );
				if ( null === $usage ) {
					return null;
				}
				return self::tokens(
					self::int_at( $usage, 'prompt_tokens' ),
					self::int_at( $usage, 'prompt_tokens_details', 'cached_tokens' ),
					0,
					self::int_at( $usage, 'completion_tokens' ),
					self::int_at( $usage, 'completion_tokens_details', 'reasoning_tokens' )
				);
			case 'openai_responses':
				$usage = self::usage_object( $answer, 'usage', 'input_tokens' );
				if ( null === $usage ) {
					return null;
				}
				return self::tokens(
					self::int_at( $usage, 'input_tokens' ),
					self::int_at( $usage, 'input_tokens_details', 'cached_tokens' ),
					0,
					self::int_at( $usage, 'output_tokens' ),
					self::int_at( $usage, 'output_tokens_details', 'reasoning_tokens' )
				);
			case 'openai_embeddings':
				$usage = self::usage_object( $answer, 'usage', 'prompt_tokens' );
				if ( null === $usage ) {
					return null;
				}
				return self::tokens( self::int_at( $usage, 'prompt_tokens' ), 0, 0, 0, 0 );
			case 'anthropic_messages':
				$usage = self::usage_object( $answer, 'usage', 'input_tokens' );
				if ( null === $usage ) {
					return null;
				}
				$read  = self::int_at( $usage, 'cache_read_input_tokens' );
				$write = self::int_at( $usage, 'cache_creation_input_tokens' );
				return self::tokens( self::int_at( $usage, 'input_tokens' ) + $read + $write, $read, $write, self::int_at( $usage, 'output_tokens' ), 0 );
			case 'gemini':
				$usage = self::usage_object( $answer, 'usageMetadata', 'promptTokenCount' );
				if ( null === $usage ) {
					return null;
				}
				$thoughts = self::int_at( $usage, 'thoughtsTokenCount' );
				return self::tokens(
					self::int_at( $usage, 'promptTokenCount' ),
					self::int_at( $usage, 'cachedContentTokenCount' ),
					0,
					self::int_at( $usage, 'candidatesTokenCount' ) + $thoughts,
					$thoughts
				);
		}
		return null;
	}

	/**
	 * The action `wp_ai_client_after_generate_result`: meters the AI client's result, unless
	 * the HTTP capture already metered the same answer.
	 *
	 * @param mixed $event The AI client's event: getResult(), getModel().
	 */
	public static function on_ai_client_result( $event ): void {
		try {
			if ( ! is_object( $event ) || ! method_exists( $event, 'getResult' ) ) {
				return;
			}
			$result = $event->getResult();
			if ( ! is_object( $result ) || ! method_exists( $result, 'getTokenUsage' ) ) {
				return;
			}
			$id = method_exists( $result, 'getId' ) ? (string) $result->getId() : '';
			if ( '' !== $id && isset( self::$captured_ids[ $id ] ) ) {
				return;
			}
			$usage = $result->getTokenUsage();
			if ( ! is_object( $usage ) ) {
				return;
			}
			$model = self::ai_client_model( $event, $result );
			if ( '' === $model ) {
				return;
			}
			$prompt     = max( 0, (int) $usage->getPromptTokens() );
			$completion = max( 0, (int) $usage->getCompletionTokens() );
			$thoughts   = method_exists( $usage, 'getThoughtTokens' ) ? (int) $usage->getThoughtTokens() : 0;
			Usage_Agent_Recorder::record(
				array(
					'model'             => $model,
					'prompt_tokens'     => $prompt,
					'completion_tokens' => $completion,
					'reasoning_tokens'  => min( max( 0, $thoughts ), $completion ),
				)
			);
		} catch ( Throwable $error ) {
			return;
		}
	}

	/**
	 * The model id of an AI client event: a string, or a model object's metadata id.
	 *
	 * @param object $event  The AI client's event.
	 * @param object $result Its result.
	 */
	private static function ai_client_model( $event, $result ): string {
		$candidates = array();
		if ( method_exists( $event, 'getModel' ) ) {
			$candidates[] = $event->getModel();
		}
		if ( method_exists( $result, 'getModelMetadata' ) ) {
			$candidates[] = $result->getModelMetadata();
		}
		foreach ( $candidates as $model ) {
			if ( is_object( $model ) && method_exists( $model, 'metadata' ) ) {
				$model = $model->metadata();
			}
			if ( is_object( $model ) && method_exists( $model, 'getId' ) ) {
				$model = $model->getId();
			}
			if ( is_string( $model ) ) {
				$model = self::clean_model( $model );
				if ( '' !== $model ) {
					return $model;
				}
			}
		}
		return '';
	}

	/**
	 * The model: the answer's, else the request's, else (Gemini) the URL's.
	 *
	 * @param string $api         The API name.
	 * @param array  $answer      The decoded answer.
	 * @param array  $parsed_args The request's arguments.
	 * @param string $url         The request URL.
	 */
	private static function model( string $api, array $answer, array $parsed_args, string $url ): string {
		$model = '';
		if ( isset( $answer['model'] ) && is_string( $answer['model'] ) ) {
			$model = $answer['model'];
		} elseif ( isset( $answer['modelVersion'] ) && is_string( $answer['modelVersion'] ) ) {
			$model = $answer['modelVersion'];
		}
		if ( '' === $model && isset( $parsed_args['body'] ) ) {
			$request = is_string( $parsed_args['body'] ) ? json_decode( $parsed_args['body'], true ) : $parsed_args['body'];
			if ( is_array( $request ) && isset( $request['model'] ) && is_string( $request['model'] ) ) {
				$model = $request['model'];
			}
		}
		if ( '' === $model && 'gemini' === $api && preg_match( '#/models/([^/:?]+)#', $url, $match ) ) {
			$model = $match[1];
		}
		return self::clean_model( $model );
	}

	/**
	 * A model name the agent accepts (1 to 128 characters of `[A-Za-z0-9._:/@-]`), or ''.
	 *
	 * @param string $model A model name.
	 */
	private static function clean_model( string $model ): string {
		$model = preg_replace( '/^models\//', '', $model );
		$model = substr( (string) preg_replace( '/[^A-Za-z0-9._:\/@-]/', '-', (string) $model ), 0, 128 );
		return (string) $model;
	}

	/**
	 * The provider's id of an answer (`id`, or Gemini's `responseId`), or ''.
	 *
	 * @param array $answer The decoded answer.
	 */
	private static function response_id( array $answer ): string {
		foreach ( array( 'id', 'responseId' ) as $key ) {
			if ( isset( $answer[ $key ] ) && is_scalar( $answer[ $key ] ) ) {
				return (string) $answer[ $key ];
			}
		}
		return '';
	}

	/**
	 * The usage object of an answer, when it has the field that proves it is one.
	 *
	 * @param array  $answer   The decoded answer.
	 * @param string $key      The usage object's key.
	 * @param string $required A field it must have.
	 */
	private static function usage_object( array $answer, string $key, string $required ): ?array {
		if ( ! isset( $answer[ $key ] ) || ! is_array( $answer[ $key ] ) || ! isset( $answer[ $key ][ $required ] ) ) {
			return null;
		}
		return $answer[ $key ];
	}

	/**
	 * A non-negative integer at a path of nested arrays, 0 when absent.
	 *
	 * @param array  $data    Where to look.
	 * @param string ...$keys The path.
	 */
	private static function int_at( array $data, string ...$keys ): int {
		foreach ( $keys as $key ) {
			if ( ! is_array( $data ) || ! isset( $data[ $key ] ) ) {
				return 0;
			}
			$data = $data[ $key ];
		}
		return is_numeric( $data ) ? max( 0, (int) $data ) : 0;
	}

	/**
	 * Our token fields, held to the agent's rules (cached parts within the prompt,
	 * reasoning within the completion).
	 *
	 * @param int $prompt     Prompt tokens, cached and cache-write included.
	 * @param int $cached     Cached prompt tokens.
	 * @param int $write      Cache-write prompt tokens.
	 * @param int $completion Completion tokens, reasoning included.
	 * @param int $reasoning  Reasoning tokens.
	 */
	private static function tokens( int $prompt, int $cached, int $write, int $completion, int $reasoning ): array {
		return array(
			'prompt_tokens'      => $prompt,
			'completion_tokens'  => $completion,
			'cached_tokens'      => min( $cached, $prompt ),
			'cache_write_tokens' => min( $write, $prompt ),
			'reasoning_tokens'   => min( $reasoning, $completion ),
		);
	}
}
