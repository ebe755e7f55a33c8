"""The release gate's client of a model server, against a stub ModelService (no server runs)."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from tensorflow_serving.apis import get_model_status_pb2

from serving.release.server_client import (
    AVAILABLE,
    END,
    ModelServerClient,
    ModelServerError,
    ServerState,
)

LOADING = get_model_status_pb2.ModelVersionStatus.LOADING


class _Unavailable(grpc.RpcError):
    pass


class _ModelService:
    """Answers GetModelStatus with the next of a list of version states (the last repeats);
    None stands for a server that does not answer yet."""

    def __init__(self, answers: list[dict[int, int] | None]) -> None:
        self.answers = answers
        self.calls = 0

    def GetModelStatus(self, request, timeout):
        answer = self.answers[min(self.calls, len(self.answers) - 1)]
        self.calls += 1
        if answer is None:
            raise _Unavailable()
        response = get_model_status_pb2.GetModelStatusResponse()
        for version, state in answer.items():
            response.model_version_status.add(version=version, state=state)
        return response


@pytest.fixture
def client() -> Iterator[ModelServerClient]:
    with ModelServerClient("127.0.0.1:1", "ranker") as c:
        yield c


def _answers(client: ModelServerClient, answers: list[dict[int, int] | None]) -> _ModelService:
    stub = _ModelService(answers)
    client._models = stub
    return stub


def test_states_follow_the_versions(client: ModelServerClient) -> None:
    _answers(client, [None])
    assert client.state() is ServerState.NOT_READY and client.version_states() is None
    _answers(client, [{1: LOADING}])
    assert client.state() is ServerState.NOT_READY
    _answers(client, [{1: END, 2: AVAILABLE}])
    assert client.state() is ServerState.READY and client.serving_version() == 2
    _answers(client, [{1: END}])
    assert client.state() is ServerState.UNAVAILABLE and client.serving_version() is None


def test_waits_through_a_silent_and_a_loading_server(client: ModelServerClient) -> None:
    stub = _answers(client, [None, None, {1: LOADING}, {1: AVAILABLE}])
    client.wait_for_version(1, timeout_s=30, poll_s=0)
    assert stub.calls == 4


def test_newest_waits_until_the_version_is_the_one_served(client: ModelServerClient) -> None:
    # After a rollback to 1, version 2 still answers for a while; 1 was unloaded (END) before.
    stub = _answers(client, [{1: END, 2: AVAILABLE}, {1: AVAILABLE, 2: AVAILABLE}, {1: AVAILABLE}])
    client.wait_for_version(1, timeout_s=30, newest=True, poll_s=0)
    assert stub.calls == 3


def test_a_version_that_failed_to_load_fails_at_once(client: ModelServerClient) -> None:
    _answers(client, [{1: LOADING}, {1: END}])
    with pytest.raises(ModelServerError, match="version 1 of 'ranker' failed to load"):
        client.wait_for_version(1, timeout_s=30, end_is_failure=True, poll_s=0)


def test_the_deadline_names_the_last_states(client: ModelServerClient) -> None:
    _answers(client, [{1: LOADING}])
    with pytest.raises(ModelServerError, match=r"within 0 s \(last seen: \{1: 'LOADING'\}\)"):
        client.wait_for_version(1, timeout_s=0, poll_s=0)


def test_a_dead_server_process_ends_the_wait(client: ModelServerClient) -> None:
    _answers(client, [None])
    with pytest.raises(ModelServerError, match="stopped before serving a version"):
        client.wait_for_version(None, timeout_s=30, alive=lambda: False, poll_s=0)
