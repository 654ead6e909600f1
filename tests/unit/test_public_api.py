import libswarm

EXPECTED = {
    "AutoDistributedModelForCausalLM", "CacheFullError", "ConfigError", "DistributedModelForCausalLM",
    "LimitError", "ModelError", "NoRouteError", "PeerUnavailableError", "ProtocolError", "RemoteError",
    "SessionError", "SwarmClient", "SwarmError", "TensorError", "UnsupportedError", "WrongModelError",
    "WrongOutputError", "__version__", "load_tokenizer", "resolve_model", "resolve_socket",
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


def test_a_socket_behind_a_directory_closed_to_this_user_says_to_join_the_group(monkeypatch, tmp_path):
    """A user outside group swarmd cannot even see /run/swarmd/swarmd.sock: the error names the
    directory and the group, not "swarmd is not running". (The test runs as root, whom no mode
    stops: the kernel's answer for another user is what os.access gives here.)"""
    import os

    from libswarm import client, paths

    closed = tmp_path / "run-swarmd"
    closed.mkdir(mode=0o750)
    real_access = os.access
    monkeypatch.setattr(paths.os, "access", lambda p, mode: False if str(p) == str(closed) else real_access(p, mode))
    for call in (lambda: libswarm.SwarmClient(socket=str(closed / "swarmd.sock")).status(),
                 lambda: client._check_listening(str(closed / "swarmd.sock"))):
        try:
            call()
        except libswarm.SwarmError as e:
            assert str(e).startswith(f"permission denied on {closed}") and "group swarmd" in str(e)
        else:
            raise AssertionError("no error")
    monkeypatch.delenv("SWARMD_SOCKET", raising=False)
    monkeypatch.setattr(client, "DEFAULT_SYSTEM_SOCKET", str(closed / "swarmd.sock"))
    try:
        libswarm.resolve_socket()
    except libswarm.SwarmError as e:
        assert "permission denied on" in str(e) and "usermod -aG swarmd" in str(e)
    else:
        raise AssertionError("no error")


def test_a_model_behind_a_directory_closed_to_this_user_is_not_called_missing(monkeypatch, tmp_path):
    import os

    from libswarm import paths
    from libswarm.errors import ModelError
    from libswarm.models import resolve_model

    closed = tmp_path / "state"
    (closed / "models").mkdir(parents=True)
    real_access = os.access
    monkeypatch.setattr(paths.os, "access", lambda p, mode: False if str(p) == str(closed) else real_access(p, mode))
    monkeypatch.setenv("SWARM_MODELS_DIR", str(closed / "models"))
    try:
        resolve_model("some-model")
    except ModelError as e:
        assert f"this user may not read {closed}: permission denied" in str(e)
    else:
        raise AssertionError("no error")
