"""mqttprov's runtime: the embedded broker, its HTTP services, external brokers and the CLI."""

from broker.packages import require_own_packages

# Before any module of ours imports config, provisioning or auth_plugin: another distribution's
# package of the same name would fail far from the cause. Cheap (three spec look-ups); the amqtt
# pin is checked where amqtt is imported (broker.embedded).
require_own_packages()
