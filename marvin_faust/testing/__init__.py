"""Helpers for the project's own tests and benchmarks (``tests/``, ``bench/``), shipped with the
package as httpx ships its ``MockTransport``: real brokers, real worker processes, plain Kafka
clients and the reliability verifier. No pytest here: the fixtures live in ``tests/``.

Importing this package, or any module of it, starts nothing and needs no test extra
(confluent-kafka is imported only by the ``librdkafka`` client family, when used).

- ``ports``: free loopback ports;
- ``processes``: the worker process (``faust -A marvin_faust worker``), the ``marvin-faust``
  command, and the live processes of the machine (/proc);
- ``kafka``: the throw-away local broker, and a plain Kafka client in the wire format;
- ``web``: the worker's HTTP views and metrics;
- ``traffic``: chat traffic from the two client families (aiokafka, librdkafka);
- ``verifier``: the reliability promise, checked against what is in Kafka.
"""
