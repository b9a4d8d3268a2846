-- spoolrelay policy: deliver the `webhook` queue as HTTP POSTs (KumoMTA's webhook shape).
--
-- Each message is POSTed as-is to WEBHOOK_URL with kumo.http, the same API as KumoMTA's
-- (build_client, client:post, request:header/body/send, response:status_code/...).
-- What the endpoint answers decides the message's fate:
--   2xx                    -> delivered (the returned string starts with the code)
--   408, 429, 5xx          -> kumo.reject(451): retried later with backoff
--   any other status       -> kumo.reject(550): permanent; with on_permanent_failure =
--                             'dead_letter' the message goes to the dead-letter area
--   no answer in time, connection refused -> send() raises: retried later (451)
-- https:// URLs trust what the broker clients trust: the system roots, or SSL_CERT_FILE.

local WEBHOOK_URL = 'http://127.0.0.1:4242/log'

kumo.on('get_queue_config', function(domain, tenant, campaign, routing_domain)
  if domain == 'webhook' then
    return kumo.make_queue_config {
      protocol = { custom_lua = { constructor = 'make.webhook' } },
      retry_interval = '10s',
      on_permanent_failure = 'dead_letter',
    }
  end
  return kumo.make_queue_config {}
end)

kumo.on('make.webhook', function(domain, tenant, campaign)
  local client = kumo.http.build_client { timeout = '10s' }
  local sender = {}
  function sender:send(message)
    local response = client
      :post(WEBHOOK_URL)
      :header('Content-Type', 'application/json')
      :body(message:get_data())
      :send()
    local code = response:status_code()
    local disposition = string.format('%d %s: %s', code, response:status_reason() or '', response:text())
    if response:status_is_success() then
      return disposition
    end
    if code == 408 or code == 429 or response:status_is_server_error() then
      kumo.reject(451, disposition)
    end
    kumo.reject(550, disposition)
  end
  function sender:close()
    client:close()
  end
  return sender
end)
