"""The cluster boundary (engine/coordinator/cluster.py): the TaskGroup's exception groups come out as one
exception, so the CLI and the learner recovery catch plain types."""

from engine.coordinator.cluster import ActorFailed, LearnerFailed, _one_error


def test_only_learner_failures_come_out_as_the_learner_failure():
    first = LearnerFailed("learner exited with code -9")
    group = BaseExceptionGroup("tg", [first, BaseExceptionGroup("inner", [LearnerFailed("rank 1 silent")])])
    assert _one_error(group) is first


def test_a_learner_and_a_worker_failure_come_out_as_one_actor_failure_naming_both():
    group = BaseExceptionGroup("tg", [LearnerFailed("learner exited"), ActorFailed("reward-0 reported an error")])
    err = _one_error(group)
    assert type(err) is ActorFailed  # not retried by recovery.py
    assert "learner exited" in str(err) and "reward-0 reported an error" in str(err)


def test_a_bug_comes_out_as_itself_with_other_failures_as_notes():
    bug = KeyError("group_id")
    err = _one_error(BaseExceptionGroup("tg", [bug, ValueError("bad chunk")]))
    assert err is bug and err.__notes__ == ["also failed: ValueError: bad chunk"]
    worker = ActorFailed("rollout-1 exited")
    err = _one_error(BaseExceptionGroup("tg", [worker, RuntimeError("pump")]))
    assert err is worker and err.__notes__ == ["also failed: RuntimeError: pump"]

