-- spoolrelay policy: relay the `kafka` queue to Apache Kafka.
--
-- This is the KumoMTA "Routing Messages via Kafka" example, corrected: the published
-- constructor used an undefined `message` and returned no sender. Here the constructor
-- builds the producer once per connection and returns a sender whose send(message)
-- publishes one record and returns a '250 ...' string (the result rule: 2xx => delivered;
-- a raised error => retried later).
--
-- Environment: SPOOLRELAY_KAFKA_BROKERS (default localhost:9092),
--              SPOOLRELAY_KAFKA_TOPIC   (default my.topic).

kumo.on('get_queue_config', function(domain, tenant, campaign, routing_domain)
  if domain == 'kafka' then
    return kumo.make_queue_config {
      protocol = {
        custom_lua = {
          -- fires the `make.kafka` event below to build a sender
          constructor = 'make.kafka',
          -- hand due messages over up to 100 at a time (sender:send_batch below): one
          -- Lua call per batch instead of per message; librdkafka batches either way
          batch_size = 100,
        },
      },
    }
  end
  return kumo.make_queue_config {}
end)

kumo.on('make.kafka', function(domain, tenant, campaign)
  local producer = kumo.kafka.build_producer {
    ['bootstrap.servers'] = os.getenv('SPOOLRELAY_KAFKA_BROKERS') or 'localhost:9092',
    -- wait for all in-sync replicas: a '250' means the record is really stored
    ['acks'] = 'all',
    -- small linger: concurrent sends are batched, a lone send is not held back long
    ['linger.ms'] = '5',
  }
  local topic = os.getenv('SPOOLRELAY_KAFKA_TOPIC') or 'my.topic'

  local sender = {}

  function sender:send(message)
    local partition, offset = producer:send {
      topic = topic,
      payload = message:get_data(),
      -- how long to keep trying to submit to kafka before a lua error is raised
      timeout = '1 minute',
    }
    return string.format('250 %s partition=%d offset=%d', topic, partition, offset)
  end

  -- Used when batch_size > 1: every record is produced concurrently, and each message
  -- gets its own result, so one failed record is retried alone.
  function sender:send_batch(messages)
    local records = {}
    for i, message in ipairs(messages) do
      records[i] = { topic = topic, payload = message:get_data(), timeout = '1 minute' }
    end
    local failed, errors = producer:send_batch(records)
    local results = {}
    local delivered = '250 ' .. topic
    for i = 1, #messages do
      results[i] = delivered
    end
    for j, i in ipairs(failed) do
      results[i] = string.format('451 %s', errors[j])
    end
    return results
  end

  function sender:close()
    producer:close()
  end

  return sender
end)
