import libswarm

EXPECTED = {
    "AutoDistributedModelForCausalLM", "CacheFullError", "ConfigError", "DistributedModelForCausalLM",
    "LimitError", "ModelError", "NoRouteError", "PeerUnavailableError", "ProtocolError", "RemoteError",
    "SessionError", "SwarmClient", "SwarmError", "TensorError", "UnsupportedError", "WrongModelError",
    "WrongOutputError", "__version__", "resolve_socket",
}


def test_public_names_do_not_drift():
    """Adding or removing a public name is a decision: update this list with it."""
    assert set(libswarm.__all__) == EXPECTED
    for name in libswarm.__all__:
        assert getattr(libswarm, name) is not None


def test_every_error_is_a_swarm_error():
    for name in libswarm.__all__:
        obj = getattr(libswarm, name)
        if isinstance(obj, type) and name.endswith("Error"):
            assert issubclass(obj, libswarm.SwarmError)


def test_socket_resolution_order(monkeypatch, tmp_path):
    monkeypatch.setenv("SWARMD_SOCKET", "/env.sock")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert libswarm.resolve_socket("/arg.sock") == "/arg.sock"
    assert libswarm.resolve_socket() == "/env.sock"
    monkeypatch.delenv("SWARMD_SOCKET")
    assert libswarm.resolve_socket() in ("/run/swarmd/swarmd.sock", str(tmp_path / "swarmd.sock"))
