"""The ``sklearn`` built-in adapter: scikit-learn models kept per session.

Clients name estimators from an allow-list (``list_estimators``); nothing is
ever imported from a client string and nothing from a client is unpickled.
``"StandardScaler+LogisticRegression"`` builds a pipeline (transformers
first, one predictor last; parameters of a pipeline step are spelled
``"logisticregression__C"``, as in ``sklearn.pipeline.make_pipeline``).

Models live in the session (``ctx.session_state``), so every command needs a
session (``pool.session()``). A model survives its worker without pickles:
``create_model`` and ``fit`` save the estimator's definition (name and
parameters) and its training data with ``ctx.save_state``, and
``restore_session`` refits it from them on the next worker. Refitting is
deterministic because an estimator's ``random_state`` left at ``None`` is
fixed to ``0`` at creation (pass another value to choose it). The training
data travels to the host once per ``fit``: it must fit in a frame
(``max_frame_bytes``).

``adapter_config``: ``{"estimators": [...]}`` narrows the allow-list (it can
never extend it).

X is a list of rows (lists of numbers), y a list of labels or targets;
results are plain lists of Python numbers (or labels). ``model_id`` is the id
string ``create_model`` returned (``result["model_id"]``); the whole dict it
returned is accepted too.
"""

from __future__ import annotations

import importlib
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ._base import Adapter
from ._command import command
from ._context import CallContext

__all__ = ["PREDICTORS", "TRANSFORMERS", "SklearnAdapter"]

#: Estimators that can end a model (they predict): name -> the module defining it.
PREDICTORS: Mapping[str, str] = {
    "LinearRegression": "sklearn.linear_model",
    "Ridge": "sklearn.linear_model",
    "Lasso": "sklearn.linear_model",
    "ElasticNet": "sklearn.linear_model",
    "LogisticRegression": "sklearn.linear_model",
    "RandomForestClassifier": "sklearn.ensemble",
    "RandomForestRegressor": "sklearn.ensemble",
    "GradientBoostingClassifier": "sklearn.ensemble",
    "GradientBoostingRegressor": "sklearn.ensemble",
    "DecisionTreeClassifier": "sklearn.tree",
    "DecisionTreeRegressor": "sklearn.tree",
    "KNeighborsClassifier": "sklearn.neighbors",
    "KNeighborsRegressor": "sklearn.neighbors",
    "SVC": "sklearn.svm",
    "SVR": "sklearn.svm",
    "GaussianNB": "sklearn.naive_bayes",
}
#: Estimators that may only come before the predictor in a pipeline.
TRANSFORMERS: Mapping[str, str] = {
    "StandardScaler": "sklearn.preprocessing",
    "MinMaxScaler": "sklearn.preprocessing",
    "RobustScaler": "sklearn.preprocessing",
    "PCA": "sklearn.decomposition",
}
#: Prefix of this adapter's keys in the host's session state.
STATE_PREFIX = "sklearn.model:"
_MAX_MODEL_ID = 200


@dataclass
class _Model:
    """One model of a session: its definition, and its training data once fitted."""

    model_id: str
    estimator_name: str
    params: dict[str, Any]
    estimator: Any
    X: list[list[float]] | None = None
    y: list[Any] | None = None

    @property
    def fitted(self) -> bool:
        return self.X is not None

    @property
    def label(self) -> str:
        return f"model {self.model_id!r} ({self.estimator_name})"

    def saved(self) -> dict[str, Any]:
        """What goes into the host's session state: enough to rebuild it, no pickles."""
        return {
            "estimator": self.estimator_name,
            "params": self.params,
            "X": self.X,
            "y": self.y,
        }


@dataclass
class _SessionModels:
    models: dict[str, _Model] = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock)


class SklearnAdapter(Adapter):
    """scikit-learn estimators from an allow-list, kept per session, refitted after a crash."""

    def setup(self, config: dict[str, Any]) -> None:
        # Imported here, in the worker: snakepool itself does not need scikit-learn.
        try:
            self._np: Any = importlib.import_module("numpy")
            pipeline: Any = importlib.import_module("sklearn.pipeline")
        except ImportError as exc:
            raise ImportError(
                f"the sklearn adapter needs scikit-learn in the worker's python: "
                f"pip install 'snakepool[sklearn]' ({exc})"
            ) from None
        self._make_pipeline = pipeline.make_pipeline
        wanted = config.get("estimators")
        known = {**PREDICTORS, **TRANSFORMERS}
        if wanted is None:
            names = set(known)
        else:
            if isinstance(wanted, str) or not all(isinstance(n, str) for n in wanted):
                raise TypeError("adapter_config['estimators'] must be a list of estimator names")
            unknown = sorted(set(wanted) - set(known))
            if unknown:
                raise ValueError(
                    f"adapter_config['estimators'] names unknown estimators {unknown}; "
                    f"known: {', '.join(sorted(known))}"
                )
            names = set(wanted)
        # name -> module; each class is imported on first use (sklearn.ensemble alone
        # takes a second), so the worker starts fast.
        self._allowed: dict[str, str] = {name: known[name] for name in sorted(names)}
        self._classes: dict[str, Any] = {}
        self._sessions_lock = threading.Lock()

    # --- commands ------------------------------------------------------------------

    @command
    def list_estimators(self) -> dict[str, list[str]]:
        """The estimator names this worker accepts: predictors, and transformers for pipelines."""
        return {
            "predictors": [n for n in self._allowed if n in PREDICTORS],
            "transformers": [n for n in self._allowed if n in TRANSFORMERS],
        }

    @command
    def create_model(
        self,
        estimator: str,
        ctx: CallContext,
        params: dict[str, Any] | None = None,
        model_id: str | None = None,
    ) -> dict[str, Any]:
        """Create an unfitted model in this session; returns its id and effective params.

        ``estimator`` is an allowed name (see ``list_estimators``) or a pipeline
        such as ``"StandardScaler+LogisticRegression"``. ``model_id`` defaults
        to a fresh id; an existing id is refused (``delete_model`` it first).
        """
        session = self._session(ctx)
        if model_id is None:
            model_id = uuid.uuid4().hex[:12]
        _check_model_id(model_id)
        model = self._build(model_id, estimator, params)
        with session.lock:
            if model_id in session.models:
                raise ValueError(
                    f"model {model_id!r} already exists in this session "
                    f"({session.models[model_id].estimator_name}); delete_model it first"
                )
            ctx.save_state(STATE_PREFIX + model_id, model.saved())
            session.models[model_id] = model
        return {"model_id": model_id, "estimator": model.estimator_name, "params": model.params}

    @command
    def fit(
        self, model_id: str, X: list[list[float]], ctx: CallContext, y: list[Any] | None = None
    ) -> dict[str, Any]:
        """Fit the model on rows ``X`` and targets ``y`` (refitting replaces earlier data).

        The data is saved with the session, so the fitted model survives its worker.
        """
        session = self._session(ctx)
        model_id = _model_ref(model_id)
        with session.lock:
            current = self._model(session, model_id)
            data = self._rows(current, X, "X")
            targets = self._targets(current, y, len(data))
            # Fit a fresh copy and persist it before swapping it in: a failed fit
            # or save leaves the previous model (and the host's copy) as they were.
            model = self._build(model_id, current.estimator_name, current.params)
            self._fit(model, data, targets)
            model.X, model.y = data.tolist(), targets
            ctx.save_state(STATE_PREFIX + model_id, model.saved())
            session.models[model_id] = model
        result: dict[str, Any] = {
            "model_id": model_id,
            "estimator": model.estimator_name,
            "n_samples": int(data.shape[0]),
            "n_features": int(data.shape[1]),
        }
        classes = getattr(model.estimator, "classes_", None)
        if classes is not None:
            result["classes"] = classes.tolist()
        return result

    @command
    def predict(self, model_id: str, X: list[list[float]], ctx: CallContext) -> list[Any]:
        """Predictions for rows ``X``: one label or value per row."""
        model, data = self._fitted_input(ctx, model_id, X)
        return self._apply(model, "predict", data)

    @command
    def predict_proba(self, model_id: str, X: list[list[float]], ctx: CallContext) -> list[Any]:
        """Class probabilities for rows ``X`` (a list per row, ordered as ``classes``)."""
        model, data = self._fitted_input(ctx, model_id, X)
        if not hasattr(model.estimator, "predict_proba"):
            hint = (
                " (SVC needs params {'probability': true})"
                if model.estimator_name.endswith("SVC")
                else ""
            )
            raise ValueError(f"{model.label} has no predict_proba{hint}")
        return self._apply(model, "predict_proba", data)

    @command
    def score(self, model_id: str, X: list[list[float]], y: list[Any], ctx: CallContext) -> float:
        """The estimator's default score on ``X``, ``y`` (accuracy for classifiers, R² for regressors)."""
        model, data = self._fitted_input(ctx, model_id, X)
        targets = self._targets(model, y, len(data))
        try:
            return float(model.estimator.score(data, self._np.asarray(targets)))
        except Exception as exc:
            raise ValueError(f"{model.label}: score failed: {exc}") from exc

    @command
    def list_models(self, ctx: CallContext) -> list[dict[str, Any]]:
        """The models of this session: id, estimator, whether fitted, feature count."""
        session = self._session(ctx)
        with session.lock:
            return [
                {
                    "model_id": m.model_id,
                    "estimator": m.estimator_name,
                    "fitted": m.fitted,
                    "n_features": len(m.X[0]) if m.X else None,
                }
                for m in sorted(session.models.values(), key=lambda m: m.model_id)
            ]

    @command
    def delete_model(self, model_id: str, ctx: CallContext) -> bool:
        """Delete the model (here and in the host's session state)."""
        session = self._session(ctx)
        model_id = _model_ref(model_id)
        with session.lock:
            self._model(session, model_id)
            ctx.save_state(STATE_PREFIX + model_id, None)
            del session.models[model_id]
        return True

    @command
    def get_params(self, model_id: str, ctx: CallContext) -> dict[str, Any]:
        """The estimator's parameters (``get_params(deep=True)``, plain values only)."""
        session = self._session(ctx)
        with session.lock:
            model = self._model(session, _model_ref(model_id))
        return {k: v for k, v in model.estimator.get_params(deep=True).items() if _plain(v)}

    # --- surviving the worker ---------------------------------------------------------

    def restore_session(self, ctx: CallContext, state: dict[str, Any]) -> None:
        """Rebuild (and refit) the session's models from their saved definitions and data."""
        session = self._session(ctx)
        with session.lock:
            for key, saved in state.items():
                if not key.startswith(STATE_PREFIX) or saved is None:
                    continue
                model_id = key[len(STATE_PREFIX) :]
                try:
                    model = self._build(model_id, saved["estimator"], saved["params"])
                    if saved.get("X") is not None:
                        data = self._np.asarray(saved["X"], dtype=float)
                        self._fit(model, data, saved.get("y"))
                        model.X, model.y = saved["X"], saved.get("y")
                except Exception:
                    ctx.log.exception("sklearn: could not restore model %r; it is gone", model_id)
                    continue
                session.models[model_id] = model

    # --- helpers -------------------------------------------------------------------

    def _session(self, ctx: CallContext) -> _SessionModels:
        if ctx.session_id is None:
            raise RuntimeError(
                "sklearn models live in a session: call through pool.session() "
                "(a call without one would forget its model at once)"
            )
        with self._sessions_lock:
            found = ctx.session_state.get("sklearn")
            if not isinstance(found, _SessionModels):
                found = ctx.session_state["sklearn"] = _SessionModels()
            return found

    def _model(self, session: _SessionModels, model_id: str) -> _Model:
        model = session.models.get(model_id)
        if model is None:
            known = ", ".join(repr(m) for m in sorted(session.models)) or "none"
            raise LookupError(f"unknown model id {model_id!r} (this session has: {known})")
        return model

    def _build(self, model_id: str, estimator: str, params: Mapping[str, Any] | None) -> _Model:
        """A fresh unfitted estimator from allow-listed names; params checked up front."""
        if not isinstance(estimator, str) or not estimator:
            raise TypeError(
                f"estimator must be a name such as 'Ridge' or 'StandardScaler+Ridge' "
                f"(see list_estimators), got {_shape(estimator)}"
            )
        if params is None:
            params = {}
        if not isinstance(params, Mapping) or not all(isinstance(k, str) for k in params):
            raise TypeError(f"params must be a dict of parameter names, got {params!r}")
        steps = estimator.split("+")
        for position, name in enumerate(steps):
            if name not in self._allowed:
                raise LookupError(
                    f"unknown estimator {name!r}; allowed predictors: "
                    f"{', '.join(n for n in self._allowed if n in PREDICTORS)}; "
                    f"transformers (pipeline steps before the predictor): "
                    f"{', '.join(n for n in self._allowed if n in TRANSFORMERS) or 'none'}"
                )
            last = position == len(steps) - 1
            if last and name not in PREDICTORS:
                raise ValueError(
                    f"estimator {estimator!r} must end with a predictor, not the transformer {name!r}"
                )
            if not last and name not in TRANSFORMERS:
                raise ValueError(
                    f"estimator {estimator!r}: only transformers may come before the last step, "
                    f"not {name!r}"
                )
        given, params = params, dict(params)
        try:
            if len(steps) == 1:
                instance = self._class(estimator)()
            else:
                instance = self._make_pipeline(*(self._class(name)() for name in steps))
                for key in params:  # pipeline-level settings (memory=...) stay ours
                    if "__" not in key:
                        raise ValueError(
                            f"pipeline parameters are per step, e.g. '{steps[-1].lower()}__<name>'; "
                            f"got {key!r}"
                        )
            instance.set_params(**params)
            for name, value in instance.get_params(deep=True).items():
                if (name == "random_state" or name.endswith("__random_state")) and value is None:
                    params[name] = 0  # deterministic, so a refit after a crash is the same model
            instance.set_params(**params)
            for part in [instance, *(s for _, s in getattr(instance, "steps", ()))]:
                validate = getattr(part, "_validate_params", None)  # sklearn >= 1.2
                if validate is not None:
                    validate()
        except Exception as exc:
            raise ValueError(f"{estimator}: invalid params {dict(given)!r}: {exc}") from None
        return _Model(model_id, estimator, params, instance)

    def _class(self, name: str) -> Any:
        """The allow-listed class ``name`` (only ever a name from this module's tables)."""
        found = self._classes.get(name)
        if found is None:
            found = self._classes[name] = getattr(
                importlib.import_module(self._allowed[name]), name
            )
        return found

    def _rows(self, model: _Model, X: Any, what: str) -> Any:
        np = self._np
        try:
            data = np.asarray(X, dtype=float)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"{model.label}: {what} must be a list of rows of numbers: {exc}"
            ) from None
        if data.ndim != 2:
            hint = " (wrap a single sample as [[...]])" if data.ndim == 1 else ""
            raise ValueError(
                f"{model.label}: {what} must be 2-D (a list of rows), got {data.ndim}-D{hint}"
            )
        if data.shape[0] == 0 or data.shape[1] == 0:
            raise ValueError(f"{model.label}: {what} is empty (shape {tuple(data.shape)})")
        return data

    def _targets(self, model: _Model, y: Any, rows: int) -> list[Any]:
        if y is None:
            raise ValueError(f"{model.label}: y is required (one target per row of X)")
        if not isinstance(y, list | tuple):
            raise TypeError(f"{model.label}: y must be a list, got {type(y).__name__}")
        if len(y) != rows:
            raise ValueError(f"{model.label}: X has {rows} rows but y has {len(y)} values")
        return list(y)

    def _fit(self, model: _Model, data: Any, targets: Any) -> None:
        try:
            model.estimator.fit(data, self._np.asarray(targets))
        except Exception as exc:
            raise ValueError(f"{model.label}: fit failed: {exc}") from None

    def _fitted_input(self, ctx: CallContext, model_id: str, X: Any) -> tuple[_Model, Any]:
        session = self._session(ctx)
        with session.lock:
            model = self._model(session, _model_ref(model_id))
        if not model.fitted:
            raise ValueError(f"{model.label} is not fitted yet: call fit first")
        data = self._rows(model, X, "X")
        expected = model.estimator.n_features_in_
        if data.shape[1] != expected:
            raise ValueError(
                f"{model.label} was fitted on {expected} features; X has {data.shape[1]} columns"
            )
        return model, data

    def _apply(self, model: _Model, method: str, data: Any) -> list[Any]:
        try:
            result: list[Any] = getattr(model.estimator, method)(data).tolist()
        except Exception as exc:
            raise ValueError(f"{model.label}: {method} failed: {exc}") from None
        return result


def _check_model_id(model_id: Any) -> None:
    if not isinstance(model_id, str):
        raise TypeError(
            f"model_id (the id for the new model) must be a str of at most {_MAX_MODEL_ID} "
            f"characters, got {_shape(model_id)}"
        )
    if not model_id or len(model_id) > _MAX_MODEL_ID:
        raise ValueError(
            f"model_id must be a non-empty str of at most {_MAX_MODEL_ID} characters, "
            f"got {model_id!r}"
        )


def _model_ref(value: Any) -> str:
    """The id a ``model_id`` argument names: the id itself, or the dict that
    ``create_model`` (or ``fit``) returned, which holds it under ``"model_id"``."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("model_id"), str):
        found: str = value["model_id"]
        return found
    raise TypeError(
        f"model_id must be the id create_model returned (a str: its result's 'model_id'), "
        f"got {_shape(value)}"
    )


def _shape(value: Any) -> str:
    """``dict {'a': 1}``: the type, and the value (shortened) for an error message."""
    text = repr(value)
    if len(text) > 100:
        text = text[:97] + "..."
    return f"{type(value).__name__} {text}"


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, bool | int | float | str):
        return True
    if isinstance(value, list | tuple):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str | int) and _plain(v) for k, v in value.items())
    return False
