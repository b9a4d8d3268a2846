-- spoolrelay policy: relay every queue to RabbitMQ over TLS (amqps://), trusting a private CA.
--
-- Set in the relay's environment:
--   SPOOLRELAY_AMQP_URL      amqps://user:password@rabbit.internal:5671/%2f
--   SPOOLRELAY_AMQP_CA       PEM file of the CA that signed the broker's certificate
--                            (unset: OpenSSL's default roots, or SSL_CERT_FILE)
--   SPOOLRELAY_AMQP_QUEUE    routing key on the default exchange (default 'logging')
-- See docs/connecting.md for every option.

kumo.on('get_queue_config', function(domain, tenant, campaign, routing_domain)
  return kumo.make_queue_config {
    protocol = { custom_lua = { constructor = 'make.amqps' } },
  }
end)

kumo.on('make.amqps', function(domain, tenant, campaign)
  local ca = os.getenv('SPOOLRELAY_AMQP_CA')
  local client = kumo.amqp.build_client {
    url = os.getenv('SPOOLRELAY_AMQP_URL') or 'amqps://localhost:5671/%2f',
    tls = ca and { ca_file = ca } or nil,
    heartbeat = 30,
    connect_timeout = '10s',
  }
  local routing_key = os.getenv('SPOOLRELAY_AMQP_QUEUE') or 'logging'
  local sender = {}
  function sender:send(message)
    local result = client:publish { routing_key = routing_key, payload = message:get_data() }:wait()
    if result.status == 'Ack' then
      return '250 ' .. kumo.json_encode(result)
    end
    kumo.reject(451, kumo.json_encode(result))
  end
  function sender:close()
    client:close()
  end
  return sender
end)
