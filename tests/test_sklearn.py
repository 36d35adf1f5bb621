"""The ``sklearn`` adapter in real worker processes: models per session, surviving crashes."""

from __future__ import annotations

from typing import Any

import psutil
import pytest

pytest.importorskip("sklearn")

import snakepool
from snakepool import RemoteError
from snakepool.testing import SessionExample, check_adapter
from waiting import wait_until

pytestmark = pytest.mark.anyio

# y = 2 * x0 - x1 + 1, exactly
REG_X = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [3.0, 5.0], [4.0, 2.0]]
REG_Y = [2 * a - b + 1 for a, b in REG_X]
# two well-separated blobs, string labels
CLS_X = [[0.0, 0.1], [0.2, 0.0], [0.1, 0.3], [5.0, 5.1], [5.2, 4.9], [4.8, 5.0]]
CLS_Y = ["small", "small", "small", "big", "big", "big"]


def worker_pid(pool: snakepool.Pool) -> int | None:
    return pool.statistics().workers[0].pid


async def test_regressor_and_classifier_fit_predict_score() -> None:
    async with snakepool.Pool("sklearn", size=1) as pool, pool.session() as s:
        created = await s.call("create_model", {"estimator": "LinearRegression", "model_id": "lr"})
        assert created == {"model_id": "lr", "estimator": "LinearRegression", "params": {}}
        fitted = await s.call("fit", {"model_id": "lr", "X": REG_X, "y": REG_Y})
        assert fitted["n_samples"] == 6 and fitted["n_features"] == 2 and "classes" not in fitted
        predictions = await s.call("predict", {"model_id": "lr", "X": [[10.0, 3.0], [0.5, 0.5]]})
        assert all(type(v) is float for v in predictions)
        assert predictions == pytest.approx([18.0, 1.5])
        assert await s.call("score", {"model_id": "lr", "X": REG_X, "y": REG_Y}) == pytest.approx(
            1.0
        )

        created = await s.call(
            "create_model",
            {
                "estimator": "StandardScaler+LogisticRegression",
                "params": {"logisticregression__C": 10},
            },
        )
        clf = created["model_id"]  # generated
        assert created["params"] == {
            "logisticregression__C": 10,
            "logisticregression__random_state": 0,  # fixed so a refit is the same model
        }
        fitted = await s.call("fit", {"model_id": clf, "X": CLS_X, "y": CLS_Y})
        assert fitted["classes"] == ["big", "small"]
        assert await s.call("predict", {"model_id": clf, "X": [[0, 0], [5, 5]]}) == [
            "small",
            "big",
        ]
        proba = await s.call("predict_proba", {"model_id": clf, "X": [[0, 0], [5, 5]]})
        assert len(proba) == 2 and all(sum(row) == pytest.approx(1.0) for row in proba)
        assert proba[0][1] > 0.9 and proba[1][0] > 0.9  # columns follow "classes"
        assert await s.call("score", {"model_id": clf, "X": CLS_X, "y": CLS_Y}) == 1.0

        await s.call("create_model", {"estimator": "RandomForestClassifier", "model_id": "rf"})
        await s.call("fit", {"model_id": "rf", "X": CLS_X, "y": [0, 0, 0, 1, 1, 1]})
        assert await s.call("predict", {"model_id": "rf", "X": [[0, 0], [5, 5]]}) == [0, 1]
        params = await s.call("get_params", {"model_id": "rf"})
        assert params["random_state"] == 0 and params["n_estimators"] == 100

        listed = await s.call("list_models")
        assert [m["model_id"] for m in listed] == sorted(["lr", "rf", clf])
        assert all(m["fitted"] and m["n_features"] == 2 for m in listed)
        assert await s.call("delete_model", {"model_id": "rf"}) is True
        assert len(await s.call("list_models")) == 2
        allowed = await s.call("list_estimators")
        assert "Ridge" in allowed["predictors"] and "StandardScaler" in allowed["transformers"]


async def test_sessions_keep_their_own_models() -> None:
    async with (
        snakepool.Pool("sklearn", size=2, affinity="strict_queue") as pool,
        pool.session() as one,
        pool.session() as two,
    ):
        for session, slope in ((one, 1.0), (two, -3.0)):
            await session.call(
                "create_model", {"estimator": "Ridge", "model_id": "m", "params": {"alpha": 0}}
            )
            X = [[float(i)] for i in range(5)]
            await session.call("fit", {"model_id": "m", "X": X, "y": [slope * x[0] for x in X]})
        assert await one.call("predict", {"model_id": "m", "X": [[10.0]]}) == pytest.approx([10.0])
        assert await two.call("predict", {"model_id": "m", "X": [[10.0]]}) == pytest.approx([-30.0])
        await one.call("delete_model", {"model_id": "m"})
        assert await one.call("list_models") == []
        assert [m["model_id"] for m in await two.call("list_models")] == ["m"]


async def test_models_survive_the_workers_death() -> None:
    async with snakepool.Pool("sklearn", size=1) as pool, pool.session() as s:
        await s.call(
            "create_model",
            {
                "estimator": "RandomForestRegressor",
                "model_id": "forest",
                "params": {"n_estimators": 20},
            },
        )
        await s.call("fit", {"model_id": "forest", "X": REG_X, "y": REG_Y})
        await s.call(
            "create_model",
            {"estimator": "KNeighborsClassifier", "model_id": "knn", "params": {"n_neighbors": 3}},
        )
        await s.call("fit", {"model_id": "knn", "X": CLS_X, "y": CLS_Y})
        await s.call("create_model", {"estimator": "SVR", "model_id": "unfitted"})
        await s.call("create_model", {"estimator": "Ridge", "model_id": "deleted"})
        await s.call("delete_model", {"model_id": "deleted"})
        probe = [[0.5, 0.5], [3.0, 2.0], [5.0, 5.0]]
        forest_before = await s.call("predict", {"model_id": "forest", "X": probe})
        knn_before = await s.call("predict_proba", {"model_id": "knn", "X": probe})
        models_before = await s.call("list_models")

        pid = worker_pid(pool)
        assert pid is not None
        psutil.Process(pid).kill()
        await wait_until(lambda: worker_pid(pool) not in (pid, None))

        # restore_session refits both from the saved definition and data
        assert await s.call("predict", {"model_id": "forest", "X": probe}) == forest_before
        assert await s.call("predict_proba", {"model_id": "knn", "X": probe}) == knn_before
        assert await s.call("list_models") == models_before
        assert [m["model_id"] for m in models_before] == ["forest", "knn", "unfitted"]
        with pytest.raises(RemoteError, match="not fitted yet"):
            await s.call("predict", {"model_id": "unfitted", "X": probe})
        assert pool.statistics().workers[0].restarts == 1


BAD_CALLS: list[tuple[str, dict[str, Any], str]] = [
    ("create_model", {"estimator": "os:system"}, r"unknown estimator 'os:system'; allowed predictors: .*LinearRegression"),
    ("create_model", {"estimator": "sklearn.svm.SVC"}, "unknown estimator"),
    ("create_model", {"estimator": "StandardScaler"}, "must end with a predictor"),
    ("create_model", {"estimator": "Ridge+LinearRegression"}, "only transformers may come before"),
    ("create_model", {"estimator": "Ridge", "params": {"alpha": -1}}, r"Ridge: invalid params.*'alpha' parameter"),
    ("create_model", {"estimator": "Ridge", "params": {"colour": "red"}}, r"Ridge: invalid params.*Invalid parameter 'colour'"),
    ("create_model", {"estimator": "StandardScaler+Ridge", "params": {"memory": "/tmp"}}, "pipeline parameters are per step"),
    ("create_model", {"estimator": "Ridge", "model_id": "clf"}, "already exists"),
    ("predict", {"model_id": "nope", "X": [[1, 2]]}, r"unknown model id 'nope' \(this session has: 'clf', 'empty', 'svc'\)"),
    ("predict", {"model_id": "empty", "X": [[1, 2]]}, r"model 'empty' \(Ridge\) is not fitted yet"),
    ("predict", {"model_id": "clf", "X": [[1, 2, 3]]}, "fitted on 2 features; X has 3 columns"),
    ("predict", {"model_id": "clf", "X": [1, 2]}, r"must be 2-D.*wrap a single sample"),
    ("predict", {"model_id": "clf", "X": [[1, "x"]]}, "must be a list of rows of numbers"),
    ("predict", {"model_id": "clf", "X": [[1, 2], [3]]}, "must be a list of rows of numbers"),
    ("predict", {"model_id": "clf", "X": []}, "X must be 2-D|empty"),
    ("predict_proba", {"model_id": "svc", "X": [[1, 2]]}, r"no predict_proba \(SVC needs"),
    ("fit", {"model_id": "empty", "X": [[1.0]], "y": [1, 2]}, "X has 1 rows but y has 2 values"),
    ("fit", {"model_id": "empty", "X": [[1.0]]}, "y is required"),
    ("fit", {"model_id": "clf", "X": [[0.0], [1.0]], "y": [0.5, 1.5]}, r"LogisticRegression\): fit failed: Unknown label type"),
    ("score", {"model_id": "clf", "X": [[1, 2]], "y": []}, "X has 1 rows but y has 0 values"),
    ("delete_model", {"model_id": "nope"}, "unknown model id"),
    ("get_params", {"model_id": "nope"}, "unknown model id"),
    ("predict", {"model_id": "clf"}, "missing a required argument: 'X'"),
]  # fmt: skip


async def test_bad_input_is_a_clear_remote_error_and_costs_no_worker() -> None:
    async with snakepool.Pool("sklearn", size=1) as pool, pool.session() as s:
        await s.call("create_model", {"estimator": "LogisticRegression", "model_id": "clf"})
        await s.call("fit", {"model_id": "clf", "X": CLS_X, "y": CLS_Y})
        await s.call("create_model", {"estimator": "Ridge", "model_id": "empty"})
        await s.call("create_model", {"estimator": "SVC", "model_id": "svc"})
        await s.call("fit", {"model_id": "svc", "X": CLS_X, "y": CLS_Y})
        pid = worker_pid(pool)
        for command, args, match in BAD_CALLS:
            with pytest.raises(RemoteError, match=match):
                await s.call(command, args)
        with pytest.raises(RemoteError, match=r"live in a session: call through pool\.session"):
            await pool.call("list_models")  # no session: nowhere to keep a model
        stats = pool.statistics()
        assert worker_pid(pool) == pid and stats.workers[0].restarts == 0
        assert stats.failed == {"application": len(BAD_CALLS) + 1}
        # the failed fit left the fitted model as it was
        assert await s.call("score", {"model_id": "clf", "X": CLS_X, "y": CLS_Y}) == 1.0


async def test_sklearn_conforms() -> None:
    report = await check_adapter(
        "sklearn",
        examples={
            "list_estimators": {},
            "create_model": {"estimator": "LogisticRegression", "model_id": "m"},
            "fit": {"model_id": "m", "X": CLS_X, "y": CLS_Y},
            "predict": {"model_id": "m", "X": [[0, 0]]},
            "predict_proba": {"model_id": "m", "X": [[0, 0]]},
            "score": {"model_id": "m", "X": CLS_X, "y": CLS_Y},
            "get_params": {"model_id": "m"},
            "list_models": {},
            "delete_model": {"model_id": "m"},
        },
        session_example=SessionExample(
            "fit",
            {"model_id": "m", "X": REG_X, "y": REG_Y},
            "predict",
            {"model_id": "m", "X": [[1.5, 2.5], [7.0, 1.0]]},
            setup=[("create_model", {"estimator": "GradientBoostingRegressor", "model_id": "m"})],
        ),
        strict_docs=True,
    )
    report.raise_for_failures()
    assert report["session-restore"].status == "pass"
    assert report["example:predict"].detail == "returned ['small']"
