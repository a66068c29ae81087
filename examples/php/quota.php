<?php
/**
 * Asks the agent's local quotas through its socket and prints the answer as JSON.
 *
 *   php examples/php/quota.php --socket PATH --user 5 [--tokens 2000] [--hold] [--release ID]
 *
 * Without --hold: the quota answer, plus "allowed_fail_open" and "allowed_fail_closed" (what
 * allowed() returns either way). With --hold: the hold answer. With --release: whether the
 * hold was open. Exits 0 when the agent answered, 1 when it did not.
 */
require __DIR__ . '/UsageAgentClient.php';

$options = getopt('', ['socket:', 'user:', 'tokens:', 'hold', 'release:', 'timeout-ms:']);
foreach (['socket', 'user'] as $required) {
    if (!isset($options[$required])) {
        fwrite(STDERR, "missing --{$required}\n");
        exit(2);
    }
}
ini_set('error_log', 'php://stderr');

$client = new UsageAgentClient($options['socket'], (int) ($options['timeout-ms'] ?? 250));
$user = (int) $options['user'];
$tokens = (int) ($options['tokens'] ?? 0);
if (isset($options['release'])) {
    echo json_encode(['released' => $client->release($options['release'])]), "\n";
    exit(0);
}
if (isset($options['hold'])) {
    $answer = $client->hold($user, $tokens);
} else {
    $answer = $client->quota($user, $tokens);
    if ($answer !== null) {
        $answer['allowed_fail_open'] = $client->allowed($user, $tokens, true);
        $answer['allowed_fail_closed'] = $client->allowed($user, $tokens, false);
    }
}
if ($answer === null) {
    echo json_encode([
        'allowed_fail_open' => $client->allowed($user, $tokens, true),
        'allowed_fail_closed' => $client->allowed($user, $tokens, false),
    ]), "\n";
    exit(1);
}
echo json_encode($answer, JSON_UNESCAPED_SLASHES), "\n";
