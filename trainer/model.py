"""The Wide & Deep model (paper section 3, equation 3) and its per-tower optimizers.

    P(Y = 1 | x) = sigmoid(w_wide^T [x, phi(x)] + w_deep^T a^(l_f) + b)

- The wide tower is a linear model over the wide features and the cross products phi(x): a
  categorical feature is one-hot in its vocabulary id, a list feature multi-hot, a numeric
  feature one-hot in its quantile bucket, a cross one-hot in its hashed id. Each is stored as a
  weight table of one column and looked up by id, which equals the dense product with the
  one-hot vector but touches only the active rows (and gives sparse gradients for FTRL).
- The deep tower learns an embedding per categorical feature (lists are mean-pooled; an empty
  list pools to zeros), concatenates them with the numeric features and feeds ReLU layers.
- Both towers' logits and one bias go into one sigmoid and one logistic loss (joint training,
  section 3.3). Each tower has its own optimizer, FTRL with L1 for wide and AdaGrad for deep by
  default; :meth:`WideDeepModel.train_step` applies each to its own variables and
  :func:`check_variable_groups` proves the groups are disjoint and cover every variable.

The same code builds the paper's three models: ``towers`` wide, deep or wide_deep.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import tensorflow as tf
import tf_keras  # tf_keras, never Keras 3: see STACK.md

from trainer.errors import TrainError
from trainer.spec import InputSpec, ModelSpec, Role
from transform.config import OptimizerConfig
from transform.features import NUM_OOV_BUCKETS

Features = Mapping[str, tf.Tensor | tf.SparseTensor]


class WideTower(tf_keras.layers.Layer):
    """The wide component: w_wide^T [x, phi(x)], one weight per active id of each input."""

    def __init__(self, inputs: Sequence[InputSpec], **kwargs: Any):
        super().__init__(name="wide", **kwargs)
        self._specs = tuple(inputs)
        self._config = {"inputs": [dataclasses.asdict(i) for i in self._specs]}
        # Zero start, as linear models usually have: FTRL with L1 keeps unused ids at zero.
        self.tables = {
            spec.name: self.add_weight(
                name=spec.name, shape=(spec.size, 1), initializer="zeros", trainable=True
            )
            for spec in self._specs
        }

    def get_config(self) -> dict[str, Any]:
        """The layer's inputs as plain data (Keras saving protocol)."""
        return {**super().get_config(), **self._config}

    def call(self, features: Features) -> tf.Tensor:
        """The wide logit, shape [batch, 1]."""
        parts = []
        for spec in self._specs:
            table, x = self.tables[spec.name], features[spec.name]
            if spec.is_sparse:
                parts.append(tf.nn.safe_embedding_lookup_sparse(table, x, combiner="sum"))
            elif spec.role is Role.NUMERIC:
                parts.append(tf.gather(table, quantile_bucket(x, spec.size)))
            else:
                parts.append(tf.gather(table, tf.reshape(x, [-1])))
        return tf.add_n(parts)

    def fired(self, features: Features) -> dict[str, tuple[tf.Tensor, tf.Tensor]]:
        """The ids active in each input and their weights, for explanations.

        Returns input name -> (ids, weights), both [batch, n] (n the longest list of the batch,
        1 for a scalar input), ids padded with -1 and weights with 0; the weights of a row sum
        to that input's part of the wide logit.
        """
        out = {}
        for spec in self._specs:
            table, x = self.tables[spec.name], features[spec.name]
            if spec.is_sparse:
                # Ordered as the lookup sees them; ids padded, weights zero where padded.
                x = tf.sparse.reorder(x)
                weights = tf.gather(tf.reshape(table, [-1]), x.values)
                ids = tf.sparse.to_dense(x, default_value=tf.constant(-1, x.dtype))
                dense_weights = tf.sparse.to_dense(x.with_values(weights))
                out[spec.name] = (ids, dense_weights)
                continue
            if spec.role is Role.NUMERIC:
                ids = quantile_bucket(x, spec.size)
            else:
                ids = tf.reshape(x, [-1])
            out[spec.name] = (ids[:, None], tf.gather(tf.reshape(table, [-1]), ids)[:, None])
        return out


class DeepTower(tf_keras.layers.Layer):
    """The deep component: embeddings and numeric features through ReLU layers (eq. 2)."""

    def __init__(
        self,
        inputs: Sequence[InputSpec],
        hidden_units: Sequence[int],
        dropout: float = 0.0,
        seed: int = 0,
        compute_dtype: str = "float32",
        embedding_stddev: float = 0.0,
        **kwargs: Any,
    ):
        super().__init__(name="deep", **kwargs)
        self._specs = tuple(inputs)
        self._config = {
            "inputs": [dataclasses.asdict(i) for i in self._specs],
            "hidden_units": list(hidden_units),
            "dropout": dropout,
            "seed": seed,
            "compute_dtype": compute_dtype,
            "embedding_stddev": embedding_stddev,
        }
        # The ReLU layers hold nearly all of the arithmetic. In bfloat16 they keep float32
        # variables (the optimizer updates full-precision weights) and multiply in bfloat16;
        # the embeddings, the logit and the loss stay float32.
        self.compute_dtype_ = tf.as_dtype(compute_dtype)
        policy = (
            tf_keras.mixed_precision.Policy("mixed_bfloat16")
            if self.compute_dtype_ == tf.bfloat16
            else None
        )
        # One table per vocabulary: features that share a vocabulary (an item and the list of
        # items a user liked) share its embeddings, so each token is learned from all of them.
        self.embeddings: dict[str, tf.Variable] = {}
        self._table_of: dict[str, str] = {}
        width = 0
        for i, spec in enumerate(self._specs):
            if spec.role is Role.NUMERIC:
                width += 1
                continue
            table = spec.vocabulary or spec.name
            self._table_of[spec.name] = table
            width += spec.embedding_dim
            if table in self.embeddings:
                continue
            self.embeddings[table] = self.add_weight(
                name=f"embedding_{table}",
                shape=(spec.size, spec.embedding_dim),
                initializer=_embedding_initializer(embedding_stddev, spec, seed * 1000 + i),
                trainable=True,
            )
        self.hidden = []
        self.dropouts = []
        for i, units in enumerate(hidden_units):
            layer = tf_keras.layers.Dense(
                units,
                activation="relu",
                kernel_initializer=tf_keras.initializers.GlorotUniform(seed=seed * 1000 + 500 + i),
                name=f"hidden_{i}",
                dtype=policy,
            )
            layer.build((None, width))
            width = units
            self.hidden.append(layer)
            self.dropouts.append(
                tf_keras.layers.Dropout(
                    dropout, seed=seed * 1000 + 700 + i, name=f"dropout_{i}", dtype=policy
                )
            )
        # w_deep of equation 3; the one bias b lives on the model.
        self.logit = tf_keras.layers.Dense(
            1,
            use_bias=False,
            kernel_initializer=tf_keras.initializers.GlorotUniform(seed=seed * 1000 + 999),
            name="logit",
        )
        self.logit.build((None, width))

    def get_config(self) -> dict[str, Any]:
        """The layer's inputs and layers as plain data (Keras saving protocol)."""
        return {**super().get_config(), **self._config}

    def call(self, features: Features, training: bool = False) -> tf.Tensor:
        """The deep logit, shape [batch, 1]."""
        parts = []
        for spec in self._specs:
            x = features[spec.name]
            if spec.role is Role.NUMERIC:
                parts.append(tf.reshape(tf.cast(x, tf.float32), [-1, 1]))
                continue
            table = self.embeddings[self._table_of[spec.name]]
            if spec.is_sparse:
                # An empty list pools to zeros rather than dropping the row.
                parts.append(tf.nn.safe_embedding_lookup_sparse(table, x, combiner="mean"))
            else:
                parts.append(tf.gather(table, tf.reshape(x, [-1])))
        h = tf.cast(tf.concat(parts, axis=1), self.compute_dtype_)
        for layer, dropout in zip(self.hidden, self.dropouts, strict=True):
            h = dropout(layer(h), training=training)
        return self.logit(tf.cast(h, tf.float32))


class WideDeepModel(tf_keras.Model):
    """Wide, deep or wide & deep model on transformed features; ``call`` returns logits.

    Every variable is created in the constructor, so a model can be checkpointed, restored or
    warm-started before it has seen any data.
    """

    def __init__(self, spec: ModelSpec, **kwargs: Any):
        super().__init__(name="wide_deep", **kwargs)
        self.spec = spec
        self.wide = WideTower(spec.wide_inputs) if spec.towers.has_wide else None
        self.deep = (
            DeepTower(
                spec.deep_inputs,
                spec.hidden_units,
                spec.dropout,
                spec.seed,
                spec.compute_dtype,
                embedding_stddev=spec.embedding_stddev,
            )
            if spec.towers.has_deep
            else None
        )
        self.bias = self.add_weight(name="bias", shape=(1,), initializer="zeros", trainable=True)
        self.tower_optimizers: dict[str, Any] = {}

    def get_config(self) -> dict[str, Any]:
        """The spec as plain data (Keras saving protocol)."""
        return {"spec": self.spec.to_dict()}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> WideDeepModel:
        """Rebuilds an untrained model from :meth:`get_config`."""
        return cls(ModelSpec.from_dict(config["spec"]))

    def call(self, features: Features, training: bool = False) -> tf.Tensor:
        """Logits, shape [batch, 1]."""
        logits = self.bias
        if self.wide is not None:
            logits = logits + self.wide(features)
        if self.deep is not None:
            logits = logits + self.deep(features, training=training)
        return logits

    def explain(self, features: Features) -> dict[str, Any]:
        """The logit of each example split into its parts (paper eq. 3), for explanations.

        ``bias``, ``wide_logit`` and ``deep_logit`` ([batch]; zero for a tower the model does
        not have) sum, in the order :meth:`call` adds them, to ``logit``; ``fired`` holds the
        wide weights that fired (see :meth:`WideTower.fired`).
        """
        logits = self.bias
        batch = _batch_size(features)
        zeros = tf.zeros([batch], tf.float32)
        wide = deep = zeros
        if self.wide is not None:
            wide_logit = self.wide(features)
            logits = logits + wide_logit
            wide = tf.reshape(wide_logit, [-1])
        if self.deep is not None:
            deep_logit = self.deep(features, training=False)
            logits = logits + deep_logit
            deep = tf.reshape(deep_logit, [-1])
        logits = tf.reshape(tf.broadcast_to(logits, [batch, 1]), [-1])
        return {
            "bias": tf.broadcast_to(self.bias, [batch]),
            "wide_logit": wide,
            "deep_logit": deep,
            "logit": logits,
            "fired": self.wide.fired(features) if self.wide is not None else {},
        }

    def variable_groups(self) -> dict[str, list[tf.Variable]]:
        """Variables each tower's optimizer trains.

        The bias b belongs to the wide tower (it is the b of the linear model w^T x + b), or to
        the deep tower in a deep-only model.
        """
        wide = list(self.wide.trainable_variables) if self.wide is not None else []
        deep = list(self.deep.trainable_variables) if self.deep is not None else []
        (wide if self.wide is not None else deep).append(self.bias)
        return {name: group for name, group in (("wide", wide), ("deep", deep)) if group}

    def set_optimizers(self, wide: Any = None, deep: Any = None) -> None:
        """Gives each tower its optimizer; refuses groups that overlap or miss a variable."""
        wanted = {"wide": wide, "deep": deep}
        groups = self.variable_groups()
        for name in groups:
            if wanted[name] is None:
                raise TrainError(f"the {name} tower has variables but no optimizer")
        check_variable_groups(groups, self.trainable_variables)
        self.tower_optimizers = {name: wanted[name] for name in groups}

    def train_step(self, data: tuple[Features, tf.Tensor]) -> dict[str, tf.Tensor]:
        """One step of joint training: one loss, each tower's gradients to its own optimizer.

        The loss is averaged over the global batch (``tf.nn.compute_average_loss``), so under a
        distribution strategy the replicas' summed gradients are those of the mean loss.
        """
        if not self.tower_optimizers:
            raise TrainError("set_optimizers() must be called before training")
        features, labels = data
        groups = self.variable_groups()
        check_variable_groups(groups, self.trainable_variables)
        names = list(groups)
        if self.spec.unknown_id_rate > 0:
            features = self._hide_ids(features)
        with tf.GradientTape() as tape:
            logits = self(features, training=True)
            per_example = tf.nn.sigmoid_cross_entropy_with_logits(
                labels=tf.reshape(tf.cast(labels, tf.float32), [-1]),
                logits=tf.reshape(logits, [-1]),
            )
            loss = tf.nn.compute_average_loss(per_example)
        grads = tape.gradient(loss, [groups[n] for n in names])
        # Across replicas, sparse gradients are all-gathered with ops whose shapes differ from
        # worker to worker, which collectives inside a compiled loop do not survive; dense
        # gradients all-reduce reliably (at the cost of bandwidth for large tables).
        context = tf.distribute.get_replica_context()
        replicas = context.num_replicas_in_sync if context is not None else 1
        for name, tower_grads in zip(names, grads, strict=True):
            pairs = [
                (tf.convert_to_tensor(g) if replicas > 1 else g, v)
                for g, v in zip(tower_grads, groups[name], strict=True)
                if g is not None
            ]
            self.tower_optimizers[name].apply_gradients(pairs)
        return {"loss": loss}

    def _hide_ids(self, features: Features) -> dict[str, tf.Tensor | tf.SparseTensor]:
        """Replaces a share of the vocabulary ids with the out-of-vocabulary id.

        Ids that the vocabulary does not know map to its out-of-vocabulary row. Without this,
        no training example updates that row (every training token is in the vocabulary), and
        an unknown user or item is scored with a random vector. Hiding ids at random teaches
        the row to mean "some token of this feature": the average of what was learned.
        """
        out = dict(features)
        step = tf.cast(
            self.tower_optimizers[next(iter(self.tower_optimizers))].iterations, tf.int32
        )
        for k, spec in enumerate(self.spec.inputs):
            if not spec.vocabulary or spec.name not in out:
                continue
            oov = tf.constant(spec.size - 1, tf.int64)  # NUM_OOV_BUCKETS == 1: the last row
            x = out[spec.name]
            values = x.values if isinstance(x, tf.SparseTensor) else x
            draw = tf.random.stateless_uniform(
                tf.shape(values), seed=tf.stack([step, k + 1000 * self.spec.seed])
            )
            hidden = tf.where(draw < self.spec.unknown_id_rate, oov, values)
            out[spec.name] = x.with_values(hidden) if isinstance(x, tf.SparseTensor) else hidden
        return out

    def predict_step(self, data: Any) -> tf.Tensor:
        """Probabilities P(Y = 1 | x), shape [batch, 1]."""
        features = data[0] if isinstance(data, tuple) else data
        return tf.sigmoid(self(features, training=False))


def _embedding_initializer(stddev: float, spec: InputSpec, seed: int) -> Any:
    """Initial rows of an embedding table: truncated normal, ``stddev`` or 1/sqrt(dim), with a
    zero out-of-vocabulary row.

    The out-of-vocabulary row starts at zero so that an id the vocabulary does not know adds
    nothing to the deep tower until training gives that row a meaning (see
    ``WideDeepModel._hide_ids``); a random row would score every unknown id as one arbitrary token.
    """
    scale = stddev if stddev > 0 else 1.0 / math.sqrt(spec.embedding_dim)
    normal = tf_keras.initializers.TruncatedNormal(stddev=scale, seed=seed)

    def init(shape: Any, dtype: Any = None, **kwargs: Any) -> tf.Tensor:
        rows = normal(shape, dtype=dtype)
        known = tf.cast(tf.range(shape[0]) < shape[0] - NUM_OOV_BUCKETS, rows.dtype)
        return rows * known[:, None]

    return init


def _batch_size(features: Features) -> tf.Tensor:
    """The number of examples in a batch of transformed features."""
    x = next(iter(features.values()))
    if isinstance(x, tf.SparseTensor):
        return tf.cast(x.dense_shape[0], tf.int32)
    return tf.shape(x)[0]


def quantile_bucket(x: tf.Tensor, num_quantiles: int) -> tf.Tensor:
    """The quantile index i - 1 of a value normalised to (i - 1) / (n_q - 1)."""
    x = tf.reshape(tf.cast(x, tf.float32), [-1])
    ids = tf.cast(tf.round(x * float(num_quantiles - 1)), tf.int64)
    return tf.clip_by_value(ids, 0, num_quantiles - 1)


def check_variable_groups(
    groups: Mapping[str, Sequence[tf.Variable]], variables: Sequence[tf.Variable]
) -> None:
    """Checks the optimizers' variable groups are disjoint and cover ``variables``.

    Raises:
      TrainError: a variable is in two groups, in none, or a group holds a stranger.
    """
    owner: dict[int, str] = {}
    for name, group in groups.items():
        for v in group:
            if id(v) in owner:
                raise TrainError(
                    f"variable {v.name} is trained by both the {owner[id(v)]} and the {name} "
                    "optimizer"
                )
            owner[id(v)] = name
    expected = {id(v) for v in variables}
    orphans = [v.name for v in variables if id(v) not in owner]
    if orphans:
        raise TrainError(f"variables trained by no optimizer: {', '.join(orphans)}")
    strangers = [v.name for g in groups.values() for v in g if id(v) not in expected]
    if strangers:
        raise TrainError(f"variables in a group that the model does not train: {strangers}")


def make_optimizer(config: OptimizerConfig, tower: str) -> Any:
    """A tower's optimizer from its config.

    The legacy tf_keras optimizers are used on purpose: they apply sparse gradients with fused
    kernels (FTRL and AdaGrad touch only the looked-up rows) and expose their slots by name
    (``get_slot``), which warm start uses to carry slots over.
    """
    legacy = tf_keras.optimizers.legacy
    name = f"{tower}_{config.name}"
    if config.name == "ftrl":
        return legacy.Ftrl(
            learning_rate=config.learning_rate,
            initial_accumulator_value=config.initial_accumulator,
            l1_regularization_strength=config.l1_regularization,
            l2_regularization_strength=config.l2_regularization,
            name=name,
        )
    if config.name == "adagrad":
        return legacy.Adagrad(
            learning_rate=config.learning_rate,
            initial_accumulator_value=config.initial_accumulator,
            name=name,
        )
    if config.name == "adam":
        return legacy.Adam(learning_rate=config.learning_rate, name=name)
    if config.name == "sgd":
        return legacy.SGD(learning_rate=config.learning_rate, name=name)
    raise TrainError(f"model.{tower}_optimizer.name: unknown optimizer {config.name!r}")


def build_model(spec: ModelSpec, optimizers: Mapping[str, OptimizerConfig] | None = None) -> Any:
    """Builds the model of ``spec``; with ``optimizers`` (tower -> config), ready to train.

    Under a distribution strategy, call it inside ``strategy.scope()``. Optimizer slots are
    created here (not at the first step) so a checkpoint restores them at once and warm start
    can overwrite them.
    """
    model = WideDeepModel(spec)
    if optimizers is not None:
        groups = model.variable_groups()
        model.set_optimizers(**{name: make_optimizer(optimizers[name], name) for name in groups})
        create_slots(model)
    return model


def create_slots(model: WideDeepModel) -> None:
    """Creates every optimizer slot without moving any weight.

    Legacy optimizers create slots at their first update. An update with an empty sparse
    gradient creates them and touches no row (a dense zero gradient would not do: FTRL
    recomputes every weight from its state and would zero them).
    """
    strategy = tf.distribute.get_strategy()
    groups = model.variable_groups()

    def apply_empty() -> None:
        for name, group in groups.items():
            pairs = []
            for v in group:
                shape = tf.shape(v, out_type=tf.int64)
                values = tf.zeros(tf.concat([[0], shape[1:]], 0), v.dtype)
                pairs.append((tf.IndexedSlices(values, tf.zeros([0], tf.int64), shape), v))
            # Nothing to aggregate: each worker creates its own slots, with no collective.
            model.tower_optimizers[name].apply_gradients(
                pairs, experimental_aggregate_gradients=False
            )

    strategy.run(apply_empty)
    for optimizer in model.tower_optimizers.values():
        optimizer.iterations.assign(0)


def checkpoint_objects(model: WideDeepModel) -> dict[str, Any]:
    """The model and its optimizers under the names checkpoints use."""
    return {
        "model": model,
        **{f"{name}_optimizer": opt for name, opt in model.tower_optimizers.items()},
    }


def optimizer_slots(optimizer: Any, variable: tf.Variable) -> dict[str, tf.Variable]:
    """The slots an optimizer keeps for one variable, by slot name."""
    return {name: optimizer.get_slot(variable, name) for name in optimizer.get_slot_names()}
