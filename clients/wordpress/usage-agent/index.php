<?php
/**
 * Nothing to see here.
 *
 * @package UsageAgent
 */

defined( 'ABSPATH' ) || exit;
