<?php
/**
 * Test-only theme template.
 *
 * @package UsageAgentTests
 */

defined( 'ABSPATH' ) || exit;
echo '<!doctype html><title>test</title><p>Usage Agent test theme</p>';
