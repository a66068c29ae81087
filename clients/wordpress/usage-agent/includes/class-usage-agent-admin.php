<?php
/**
 * What people see: Tools > AI usage, the plugin's settings, and each user's own usage on
 * their profile.
 *
 * Every number comes from the agent (`GET /v1/usage`, `/v1/status`, `/v1/quota`) when the
 * screen is drawn; the plugin keeps no copy. Every value is escaped where it is printed.
 * "Sync now" and "Retry failed" are POST forms with a nonce, for `manage_options` only.
 *
 * @package UsageAgent
 */

defined( 'ABSPATH' ) || exit;

/**
 * Admin screens.
 */
final class Usage_Agent_Admin {

	const PAGE       = 'usage-agent';
	const CAPABILITY = 'manage_options';

	/**
	 * Hooks the screens into WordPress.
	 */
	public static function register(): void {
		add_action( 'admin_menu', array( __CLASS__, 'menu' ) );
		add_action( 'admin_init', array( __CLASS__, 'settings' ) );
		add_action( 'admin_post_usage_agent_sync', array( __CLASS__, 'handle_sync' ) );
		add_action( 'admin_post_usage_agent_retry_failed', array( __CLASS__, 'handle_retry_failed' ) );
		add_action( 'show_user_profile', array( __CLASS__, 'profile' ) );
		add_action( 'edit_user_profile', array( __CLASS__, 'profile' ) );
	}

	/**
	 * Adds Tools > AI usage.
	 */
	public static function menu(): void {
		add_management_page(
			__( 'AI usage', 'usage-agent' ),
			__( 'AI usage', 'usage-agent' ),
			self::CAPABILITY,
			self::PAGE,
			array( __CLASS__, 'render_page' )
		);
	}

	/**
	 * Registers the options with the Settings API.
	 */
	public static function settings(): void {
		register_setting(
			'usage_agent',
			'usage_agent_socket',
			array(
				'type'              => 'string',
				'sanitize_callback' => 'sanitize_text_field',
				'default'           => '',
			)
		);
		foreach ( array( 'usage_agent_capture_http', 'usage_agent_enforce', 'usage_agent_fail_closed' ) as $name ) {
			register_setting(
				'usage_agent',
				$name,
				array(
					'type'              => 'string',
					'sanitize_callback' => array( __CLASS__, 'sanitize_checkbox' ),
					'default'           => 'usage_agent_capture_http' === $name ? '1' : '',
				)
			);
		}
		add_settings_section( 'usage_agent_main', __( 'Settings', 'usage-agent' ), '__return_false', self::PAGE );
		add_settings_field( 'usage_agent_socket', __( 'Agent socket', 'usage-agent' ), array( __CLASS__, 'field_socket' ), self::PAGE, 'usage_agent_main', array( 'label_for' => 'usage_agent_socket' ) );
		$boxes = array(
			'usage_agent_capture_http' => __( 'Meter the answers of known AI APIs requested through WordPress HTTP', 'usage-agent' ),
			'usage_agent_enforce'      => __( 'Stop AI client calls of users over their limit', 'usage-agent' ),
			'usage_agent_fail_closed'  => __( 'Treat users as over their limit while the agent does not answer', 'usage-agent' ),
		);
		foreach ( $boxes as $name => $label ) {
			add_settings_field(
				$name,
				$label,
				array( __CLASS__, 'field_checkbox' ),
				self::PAGE,
				'usage_agent_main',
				array(
					'label_for' => $name,
					'default'   => 'usage_agent_capture_http' === $name ? '1' : '',
				)
			);
		}
	}

	/**
	 * Sanitizes a checkbox option to '1' or ''.
	 *
	 * @param mixed $value The submitted value.
	 */
	public static function sanitize_checkbox( $value ): string {
		return empty( $value ) ? '' : '1';
	}

	/**
	 * The socket field.
	 */
	public static function field_socket(): void {
		$fixed = defined( 'USAGE_AGENT_SOCKET' );
		printf(
			'<input type="text" class="regular-text code" id="usage_agent_socket" name="usage_agent_socket" value="%s" placeholder="%s" %s />',
			esc_attr( (string) get_option( 'usage_agent_socket', '' ) ),
			esc_attr( Usage_Agent_Client::DEFAULT_SOCKET ),
			disabled( $fixed, true, false )
		);
		if ( $fixed ) {
			echo '<p class="description">' . esc_html__( 'Set by USAGE_AGENT_SOCKET in wp-config.php.', 'usage-agent' ) . '</p>';
		}
	}

	/**
	 * A checkbox field.
	 *
	 * @param array $args The field's arguments.
	 */
	public static function field_checkbox( array $args ): void {
		$name = (string) $args['label_for'];
		printf(
			'<input type="checkbox" id="%1$s" name="%1$s" value="1" %2$s />',
			esc_attr( $name ),
			checked( (string) get_option( $name, $args['default'] ), '1', false )
		);
	}

	/**
	 * Runs a sync now (POST from the page).
	 */
	public static function handle_sync(): void {
		self::guard( 'usage_agent_sync' );
		$answer = Usage_Agent_Client::read( 'POST', '/v1/sync', null, 60000 );
		$body   = Usage_Agent_Client::ok_body( $answer );
		if ( null === $body ) {
			$notice = array( 'error', self::failure( $answer ) );
		} elseif ( ! empty( $body['error'] ) ) {
			$notice = array(
				'error',
				sprintf(
					/* translators: %s: why the sync failed. */
					__( 'The sync failed: %s', 'usage-agent' ),
					isset( $body['error']['message'] ) ? (string) $body['error']['message'] : ''
				),
			);
		} else {
			$notice = array(
				'success',
				sprintf(
					/* translators: 1: events sent, 2: events the backend accepted. */
					__( 'Sync done: %1$d sent, %2$d accepted.', 'usage-agent' ),
					isset( $body['sent'] ) ? (int) $body['sent'] : 0,
					isset( $body['accepted'] ) ? (int) $body['accepted'] : 0
				),
			);
		}
		self::back_to_page( $notice );
	}

	/**
	 * Requeues the failed events (POST from the page).
	 */
	public static function handle_retry_failed(): void {
		self::guard( 'usage_agent_retry_failed' );
		$answer = Usage_Agent_Client::read( 'POST', '/v1/retry-failed' );
		$body   = Usage_Agent_Client::ok_body( $answer );
		if ( null === $body ) {
			$notice = array( 'error', self::failure( $answer ) );
		} else {
			$notice = array(
				'success',
				sprintf(
					/* translators: %d: number of events queued again. */
					__( '%d failed events queued again.', 'usage-agent' ),
					isset( $body['requeued'] ) ? (int) $body['requeued'] : 0
				),
			);
		}
		self::back_to_page( $notice );
	}

	/**
	 * Tools > AI usage.
	 */
	public static function render_page(): void {
		if ( ! current_user_can( self::CAPABILITY ) ) {
			wp_die( esc_html__( 'Sorry, you are not allowed to access this page.', 'usage-agent' ), 403 );
		}
		$status = Usage_Agent_Client::ok_body( Usage_Agent_Client::read( 'GET', '/v1/status' ) );
		$from   = wp_date( 'Y-m-d', time() - 29 * DAY_IN_SECONDS );
		echo '<div class="wrap usage-agent">';
		echo '<h1>' . esc_html__( 'AI usage', 'usage-agent' ) . '</h1>';
		self::render_notice();
		self::render_status( $status );
		if ( null !== $status ) {
			echo '<h2>' . esc_html(
				sprintf(
					/* translators: %s: first day shown. */
					__( 'Last 30 days (since %s)', 'usage-agent' ),
					$from
				)
			) . '</h2>';
			$groups = array(
				'day'    => __( 'Day', 'usage-agent' ),
				'user'   => __( 'User', 'usage-agent' ),
				'origin' => __( 'Origin', 'usage-agent' ),
				'source' => __( 'Source', 'usage-agent' ),
				'model'  => __( 'Model', 'usage-agent' ),
			);
			foreach ( $groups as $group => $label ) {
				$usage = self::usage( array( 'from' => $from ), $group );
				echo '<h3>' . esc_html(
					sprintf(
						/* translators: %s: what the table is grouped by. */
						__( 'By %s', 'usage-agent' ),
						strtolower( $label )
					)
				) . '</h3>';
				self::render_usage_table( $usage, array( $group => $label ), 'usage-agent-by-' . $group );
			}
		}
		echo '<form method="post" action="options.php">';
		settings_fields( 'usage_agent' );
		do_settings_sections( self::PAGE );
		submit_button();
		echo '</form></div>';
	}

	/**
	 * The profile section: this user's own usage this month, and their limits.
	 *
	 * @param WP_User $user The user whose profile is shown.
	 */
	public static function profile( $user ): void {
		if ( ! $user instanceof WP_User || ! current_user_can( 'edit_user', $user->ID ) ) {
			return;
		}
		$usage = self::user_usage( (int) $user->ID, wp_date( 'Y-m-01' ) );
		echo '<div id="usage-agent-profile">';
		echo '<h2>' . esc_html__( 'AI usage this month', 'usage-agent' ) . '</h2>';
		if ( null === $usage ) {
			echo '<p>' . esc_html__( 'The usage agent does not answer just now.', 'usage-agent' ) . '</p></div>';
			return;
		}
		self::render_usage_table(
			$usage,
			array(
				'origin' => __( 'Origin', 'usage-agent' ),
				'model'  => __( 'Model', 'usage-agent' ),
			),
			'usage-agent-profile-usage'
		);
		$quota = Usage_Agent_Client::ok_body( Usage_Agent_Client::read( 'GET', '/v1/quota?user_id=' . (int) $user->ID, null, 1000 ) );
		if ( null !== $quota && ! empty( $quota['limits'] ) && is_array( $quota['limits'] ) ) {
			$scopes = array(
				'user_daily'   => __( 'Your tokens today', 'usage-agent' ),
				'user_monthly' => __( 'Your tokens this month', 'usage-agent' ),
				'site_daily'   => __( 'Site tokens today', 'usage-agent' ),
				'site_monthly' => __( 'Site tokens this month', 'usage-agent' ),
			);
			echo '<h3>' . esc_html__( 'Limits', 'usage-agent' ) . '</h3>';
			echo '<table class="widefat striped" id="usage-agent-profile-quota"><thead><tr>';
			foreach ( array( __( 'Limit', 'usage-agent' ), __( 'Allowed', 'usage-agent' ), __( 'Used', 'usage-agent' ), __( 'Remaining', 'usage-agent' ), __( 'Resets', 'usage-agent' ) ) as $heading ) {
				echo '<th>' . esc_html( $heading ) . '</th>';
			}
			echo '</tr></thead><tbody>';
			foreach ( $quota['limits'] as $limit ) {
				$scope = isset( $limit['scope'] ) ? (string) $limit['scope'] : '';
				echo '<tr data-scope="' . esc_attr( $scope ) . '">';
				echo '<td>' . esc_html( isset( $scopes[ $scope ] ) ? $scopes[ $scope ] : $scope ) . '</td>';
				foreach ( array( 'limit', 'used', 'remaining' ) as $key ) {
					echo '<td>' . esc_html( number_format_i18n( isset( $limit[ $key ] ) ? (int) $limit[ $key ] : 0 ) ) . '</td>';
				}
				echo '<td>' . esc_html( isset( $limit['resets_at'] ) ? (string) $limit['resets_at'] : '' ) . '</td>';
				echo '</tr>';
			}
			echo '</tbody></table>';
		}
		echo '</div>';
	}

	/**
	 * `GET /v1/usage` grouped one way, or null when the agent does not answer.
	 *
	 * @param array  $query    `from`, `to`, `user_id`.
	 * @param string $group_by The grouping.
	 */
	private static function usage( array $query, string $group_by ): ?array {
		$query['group_by'] = $group_by;
		return Usage_Agent_Client::ok_body( Usage_Agent_Client::read( 'GET', '/v1/usage?' . http_build_query( $query ) ) );
	}

	/**
	 * One user's usage since `$from` by origin and model. Asks the agent for that user's rows
	 * (`user_id`); an agent that does not filter by user answers rows per user, and only this
	 * user's are kept.
	 *
	 * @param int    $user_id The user.
	 * @param string $from    First day.
	 */
	private static function user_usage( int $user_id, string $from ): ?array {
		$answer = Usage_Agent_Client::read(
			'GET',
			'/v1/usage?' . http_build_query(
				array(
					'from'     => $from,
					'group_by' => 'user,origin,model',
					'user_id'  => $user_id,
				)
			)
		);
		if ( null !== $answer && 400 === $answer['status'] ) {
			$answer = Usage_Agent_Client::read(
				'GET',
				'/v1/usage?' . http_build_query(
					array(
						'from'     => $from,
						'group_by' => 'user,origin,model',
					)
				)
			);
		}
		$usage = Usage_Agent_Client::ok_body( $answer );
		if ( null === $usage || ! isset( $usage['rows'] ) || ! is_array( $usage['rows'] ) ) {
			return null;
		}
		$usage['rows'] = array_values(
			array_filter(
				$usage['rows'],
				static function ( $row ) use ( $user_id ) {
					return is_array( $row ) && isset( $row['user_id'] ) && (int) $row['user_id'] === $user_id;
				}
			)
		);
		return $usage;
	}

	/**
	 * The sync status box with its two buttons.
	 *
	 * @param array|null $status The agent's status, or null.
	 */
	private static function render_status( ?array $status ): void {
		$spool = Usage_Agent_Spool::count();
		echo '<h2>' . esc_html__( 'Sync status', 'usage-agent' ) . '</h2>';
		if ( null === $status ) {
			echo '<div class="notice notice-error inline"><p>' . esc_html(
				sprintf(
					/* translators: %s: path of the agent's socket. */
					__( 'The usage agent does not answer on %s. AI calls are kept in the spool meanwhile.', 'usage-agent' ),
					Usage_Agent_Client::socket_path()
				)
			) . '</p></div>';
		}
		$last_error = '';
		if ( null !== $status && is_array( $status['last_error'] ?? null ) ) {
			$last_error = sprintf( '%s: %s (%s)', $status['last_error']['category'] ?? '', $status['last_error']['message'] ?? '', $status['last_error']['at'] ?? '' );
		}
		$categories = array();
		if ( null !== $status && is_array( $status['error_categories'] ?? null ) ) {
			foreach ( $status['error_categories'] as $category => $count ) {
				$categories[] = $category . ' ' . (int) $count;
			}
		}
		$rows = array(
			'status'      => array( __( 'Status', 'usage-agent' ), null === $status ? __( 'unreachable', 'usage-agent' ) : (string) ( $status['status'] ?? '' ) ),
			'pending'     => array( __( 'Pending events', 'usage-agent' ), null === $status ? '' : number_format_i18n( (int) ( $status['pending_events'] ?? 0 ) ) ),
			'failed'      => array( __( 'Failed events', 'usage-agent' ), null === $status ? '' : number_format_i18n( (int) ( $status['failed_events'] ?? 0 ) ) ),
			'last-sync'   => array( __( 'Last sync', 'usage-agent' ), null === $status ? '' : (string) ( $status['last_sync'] ?? __( 'never', 'usage-agent' ) ) ),
			'last-error'  => array( __( 'Last error', 'usage-agent' ), '' === $last_error ? __( 'none', 'usage-agent' ) : $last_error ),
			'error-kinds' => array( __( 'Failed syncs (24 h)', 'usage-agent' ), implode( ', ', $categories ) ),
			'spool'       => array( __( 'Spooled events', 'usage-agent' ), number_format_i18n( $spool ) ),
		);
		echo '<table class="widefat striped" id="usage-agent-status" style="max-width:48em"><tbody>';
		foreach ( $rows as $key => $row ) {
			printf( '<tr data-key="%s"><th scope="row">%s</th><td>%s</td></tr>', esc_attr( $key ), esc_html( $row[0] ), esc_html( $row[1] ) );
		}
		echo '</tbody></table><p>';
		foreach ( array( 'usage_agent_sync' => __( 'Sync now', 'usage-agent' ), 'usage_agent_retry_failed' => __( 'Retry failed', 'usage-agent' ) ) as $action => $label ) {
			printf( '<form method="post" action="%s" style="display:inline-block;margin-right:.5em">', esc_url( admin_url( 'admin-post.php' ) ) );
			printf( '<input type="hidden" name="action" value="%s" />', esc_attr( $action ) );
			wp_nonce_field( $action );
			submit_button( $label, 'secondary', 'submit', false, array( 'id' => $action ) );
			echo '</form>';
		}
		echo '</p>';
	}

	/**
	 * One usage table.
	 *
	 * @param array|null $usage   The agent's answer.
	 * @param array      $columns The grouped columns, key => heading.
	 * @param string     $id      The table's HTML id.
	 */
	private static function render_usage_table( ?array $usage, array $columns, string $id ): void {
		if ( null === $usage || ! isset( $usage['rows'] ) || ! is_array( $usage['rows'] ) ) {
			echo '<p>' . esc_html__( 'The usage agent did not answer.', 'usage-agent' ) . '</p>';
			return;
		}
		if ( array() === $usage['rows'] ) {
			echo '<p id="' . esc_attr( $id ) . '">' . esc_html__( 'No AI calls yet.', 'usage-agent' ) . '</p>';
			return;
		}
		$numbers = array(
			'events'             => __( 'Calls', 'usage-agent' ),
			'prompt_tokens'      => __( 'Prompt tokens', 'usage-agent' ),
			'completion_tokens'  => __( 'Completion tokens', 'usage-agent' ),
			'total_tokens'       => __( 'Total tokens', 'usage-agent' ),
			'cached_tokens'      => __( 'Cached', 'usage-agent' ),
			'cache_write_tokens' => __( 'Cache writes', 'usage-agent' ),
			'reasoning_tokens'   => __( 'Reasoning', 'usage-agent' ),
		);
		echo '<table class="widefat striped" id="' . esc_attr( $id ) . '"><thead><tr>';
		foreach ( array_merge( array_values( $columns ), array_values( $numbers ) ) as $heading ) {
			echo '<th scope="col">' . esc_html( $heading ) . '</th>';
		}
		echo '</tr></thead><tbody>';
		foreach ( $usage['rows'] as $row ) {
			echo '<tr>';
			foreach ( array_keys( $columns ) as $column ) {
				$value = 'user' === $column ? self::user_label( (int) ( $row['user_id'] ?? 0 ) ) : (string) ( $row[ $column ] ?? '—' );
				echo '<td data-column="' . esc_attr( $column ) . '">' . esc_html( $value ) . '</td>';
			}
			foreach ( array_keys( $numbers ) as $number ) {
				echo '<td data-column="' . esc_attr( $number ) . '">' . esc_html( number_format_i18n( (int) ( $row[ $number ] ?? 0 ) ) ) . '</td>';
			}
			echo '</tr>';
		}
		echo '</tbody></table>';
	}

	/**
	 * A user's display name, or what stands for none.
	 *
	 * @param int $user_id The user.
	 */
	private static function user_label( int $user_id ): string {
		if ( 0 === $user_id ) {
			return __( 'No user (cron, system)', 'usage-agent' );
		}
		$user = get_userdata( $user_id );
		return $user ? $user->display_name . ' (#' . $user_id . ')' : '#' . $user_id;
	}

	/**
	 * Capability and nonce of a POST action; dies when either is missing.
	 *
	 * @param string $action The nonce action.
	 */
	private static function guard( string $action ): void {
		if ( ! current_user_can( self::CAPABILITY ) ) {
			wp_die( esc_html__( 'Sorry, you are not allowed to do that.', 'usage-agent' ), 403 );
		}
		check_admin_referer( $action );
	}

	/**
	 * Why an agent request gave no usable answer.
	 *
	 * @param array|null $answer What the client returned.
	 */
	private static function failure( ?array $answer ): string {
		if ( null === $answer ) {
			return __( 'The usage agent does not answer.', 'usage-agent' );
		}
		$message = isset( $answer['body']['error']['message'] ) ? (string) $answer['body']['error']['message'] : '';
		return sprintf(
			/* translators: 1: HTTP status, 2: the agent's message. */
			__( 'The usage agent answered %1$d: %2$s', 'usage-agent' ),
			$answer['status'],
			$message
		);
	}

	/**
	 * Back to the page, with a notice for this user.
	 *
	 * @param array $notice `[type, message]`.
	 */
	private static function back_to_page( array $notice ): void {
		set_transient( 'usage_agent_notice_' . get_current_user_id(), $notice, MINUTE_IN_SECONDS );
		wp_safe_redirect( admin_url( 'tools.php?page=' . self::PAGE ) );
		exit;
	}

	/**
	 * The notice left by the last action, once.
	 */
	private static function render_notice(): void {
		$key    = 'usage_agent_notice_' . get_current_user_id();
		$notice = get_transient( $key );
		if ( ! is_array( $notice ) || 2 !== count( $notice ) ) {
			return;
		}
		delete_transient( $key );
		printf(
			'<div class="notice notice-%s is-dismissible" id="usage-agent-notice"><p>%s</p></div>',
			esc_attr( 'success' === $notice[0] ? 'success' : 'error' ),
			esc_html( (string) $notice[1] )
		);
	}
}
