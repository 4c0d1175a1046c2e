"""A fleet fed from one registry: bundles travel as OCI artifacts, releases are announced over MQTT.

* :mod:`.config`  - the ``fleet`` section of ``edge.yaml`` (registry, rollout policy).
* :mod:`.release` - the retained announcement and canary verdict messages, and their topics.
* :mod:`.oci`     - push a bundle to a registry and pull it back by digest (``oras``), every byte checked.
* :mod:`.rollout` - the manual / auto / canary policy as a small state machine (no broker, no registry).
* :mod:`.agent`   - the station's fleet agent: hears releases, pulls, stages, asks the service to activate.
* :mod:`.announce` - the retained release announcement (``weakrest-train push --announce``).
* :mod:`.view`    - what ``weakrest-calibrate list --fleet`` shows, read from the retained messages.

Nothing here imports the service: the service composes the config section and hands the agent what it
needs (the store, a way to reload between frames, a way to add keys to its status).
"""
