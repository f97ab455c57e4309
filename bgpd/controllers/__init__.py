"""calico-py-kube-controllers: a process of its own (one replica), beside the node daemon; it shares no code
with the node daemon's dataplane, speaker or CNI (an import contract in pyproject.toml says so)."""
