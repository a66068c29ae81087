<?php
/**
 * UsageAgentClient: records AI token usage with the local usage-agent over its Unix socket.
 *
 * Dependency-free (PHP's curl extension only). Metering must never slow the site down or
 * break it: every call has a short timeout, and any failure (agent stopped, socket missing,
 * validation error) is logged with error_log() and reported as null, never thrown.
 *
 * WordPress: include this file from a plugin or mu-plugin, then after each AI call
 *
 *     $agent = new UsageAgentClient('/run/usage-agent/agent.sock');
 *     $agent->record([
 *         'wp_user_id'        => get_current_user_id(),
 *         'source'            => 'bulk',            // inline, bulk, queue or manual
 *         'model'             => 'gpt-4o-mini',
 *         'prompt_tokens'     => $usage['prompt_tokens'],
 *         'completion_tokens' => $usage['completion_tokens'],
 *         'context'           => ['attachment_id' => $attachment_id],
 *     ]);
 *
 * Before a call, a site with local quotas ([quota] in agent.toml) can ask first:
 *
 *     if (!$agent->allowed(get_current_user_id(), 2000)) { ... refuse politely ... }
 *
 * or, where several calls run at once, hold the tokens so they cannot overshoot together,
 * and pass the hold id with the call's event, which settles it:
 *
 *     $hold = $agent->hold(get_current_user_id(), 2000);
 *     if ($hold !== null && !$hold['allowed']) { ... refuse ... }
 *     ... make the AI call ...
 *     $agent->record([... , 'hold_id' => $hold['hold_id'] ?? null]);
 *
 * Give the web server's user access to the socket with `socket_group = "www-data"` in
 * /etc/usage-agent/agent.toml. Never put prompt or alt-text content in `context`.
 */
final class UsageAgentClient
{
    private string $socketPath;
    private int $timeoutMs;

    public function __construct(string $socketPath = '/run/usage-agent/agent.sock', int $timeoutMs = 250)
    {
        $this->socketPath = $socketPath;
        $this->timeoutMs = $timeoutMs;
    }

    /**
     * Records one event. Returns the agent's decoded JSON answer
     * (e.g. ['event_id' => '...', 'status' => 'recorded']) or null on any failure.
     * A stable event_id (UUID) makes a retried call safe: the agent answers 'duplicate'.
     */
    public function record(array $event): ?array
    {
        if (!isset($event['event_id'])) {
            $event['event_id'] = self::uuid4();
        }
        return $this->request('POST', '/v1/events', $event);
    }

    /** Records up to 1000 events at once, all or nothing. */
    public function recordBatch(array $events): ?array
    {
        return $this->request('POST', '/v1/events', ['events' => array_values($events)]);
    }

    /**
     * The quota answer for $userId about to spend $tokens:
     * ['user_id' => 5, 'allowed' => true, 'limits' => [...]], or null when the agent does not answer.
     */
    public function quota(int $userId, int $tokens = 0): ?array
    {
        $query = http_build_query(['user_id' => $userId, 'tokens' => $tokens]);
        return $this->request('GET', '/v1/quota?' . $query, null, 'no quota answer');
    }

    /**
     * Whether $userId may spend $tokens more. When the agent does not answer, $failOpen
     * decides (by default the call goes ahead: metering must not take the site down).
     */
    public function allowed(int $userId, int $tokens = 0, bool $failOpen = true): bool
    {
        $answer = $this->quota($userId, $tokens);
        return $answer === null ? $failOpen : (bool) ($answer['allowed'] ?? $failOpen);
    }

    /**
     * Holds $tokens for $userId until the event carrying the returned 'hold_id' is recorded
     * (or release() is called, or the hold expires). Returns the answer: with 'hold_id' and
     * 'allowed' => true when held, 'allowed' => false when a limit would be passed; null when
     * the agent does not answer.
     */
    public function hold(int $userId, int $tokens): ?array
    {
        return $this->request('POST', '/v1/quota/holds', ['user_id' => $userId, 'tokens' => $tokens], 'nothing held');
    }

    /** Releases a hold whose call was not made; true when it was open. */
    public function release(string $holdId): bool
    {
        return $this->request('DELETE', '/v1/quota/holds/' . rawurlencode($holdId), null, 'hold not released') !== null;
    }

    /** The agent's sync status, or null when it does not answer. */
    public function status(): ?array
    {
        return $this->request('GET', '/v1/status', null, 'no status');
    }

    /** $failed says what a failure means, for the log line. */
    private function request(string $method, string $path, ?array $body, string $failed = 'usage not recorded'): ?array
    {
        if (!function_exists('curl_init')) {
            error_log("usage-agent: the PHP curl extension is missing; {$failed}");
            return null;
        }
        $curl = curl_init('http://localhost' . $path);
        $options = [
            CURLOPT_UNIX_SOCKET_PATH => $this->socketPath,
            CURLOPT_CUSTOMREQUEST => $method,
            CURLOPT_RETURNTRANSFER => true,
            CURLOPT_CONNECTTIMEOUT_MS => $this->timeoutMs,
            CURLOPT_TIMEOUT_MS => $this->timeoutMs * 4,
            CURLOPT_NOSIGNAL => true,
            CURLOPT_HTTPHEADER => ['Content-Type: application/json', 'Expect:'],
        ];
        if ($body !== null) {
            $options[CURLOPT_POSTFIELDS] = json_encode($body, JSON_UNESCAPED_SLASHES);
        }
        curl_setopt_array($curl, $options);
        $raw = curl_exec($curl);
        $status = (int) curl_getinfo($curl, CURLINFO_RESPONSE_CODE);
        $error = curl_error($curl);
        curl_close($curl);

        if ($raw === false) {
            error_log("usage-agent: no answer on {$this->socketPath} ({$error}); {$failed}");
            return null;
        }
        $answer = json_decode($raw, true);
        if ($status >= 300 || !is_array($answer)) {
            $message = $answer['error']['message'] ?? $raw;
            error_log("usage-agent: HTTP {$status}: {$message}");
            return null;
        }
        return $answer;
    }

    private static function uuid4(): string
    {
        $bytes = random_bytes(16);
        $bytes[6] = chr((ord($bytes[6]) & 0x0f) | 0x40);
        $bytes[8] = chr((ord($bytes[8]) & 0x3f) | 0x80);
        return vsprintf('%s%s-%s-%s-%s-%s%s%s', str_split(bin2hex($bytes), 4));
    }
}
