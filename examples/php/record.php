<?php
/**
 * Records one event through the agent's socket and prints the agent's JSON answer.
 *
 *   php examples/php/record.php --socket PATH --user 5 --source bulk --model gpt-4o-mini \
 *       --prompt 150 --completion 25 [--hold-id ID] [--timeout-ms 250]
 *
 * Exits 0 when the agent answered, 1 when it did not (the reason goes to stderr).
 */
require __DIR__ . '/UsageAgentClient.php';

$options = getopt('', ['socket:', 'user:', 'source:', 'model:', 'prompt:', 'completion:', 'hold-id:', 'timeout-ms:']);
foreach (['socket', 'user', 'source', 'model', 'prompt', 'completion'] as $required) {
    if (!isset($options[$required])) {
        fwrite(STDERR, "missing --{$required}\n");
        exit(2);
    }
}
ini_set('error_log', 'php://stderr');

$client = new UsageAgentClient($options['socket'], (int) ($options['timeout-ms'] ?? 250));
$event = [
    'user_id' => (int) $options['user'],
    'source' => $options['source'],
    'model' => $options['model'],
    'prompt_tokens' => (int) $options['prompt'],
    'completion_tokens' => (int) $options['completion'],
];
if (isset($options['hold-id'])) {
    $event['hold_id'] = $options['hold-id'];
}
$answer = $client->record($event);
if ($answer === null) {
    exit(1);
}
echo json_encode($answer, JSON_UNESCAPED_SLASHES), "\n";
