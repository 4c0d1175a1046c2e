"""Sparkplug B output: the edge node (:mod:`.node`) and its payloads (:mod:`.payloads`, protobuf schema in
``sparkplug_b.proto``; ``sparkplug_b_pb2`` is generated from it by ``make proto``)."""
