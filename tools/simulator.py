"""A seeded simulator of the app-store setting of Cheng et al. (2016), with a known ground truth.

The paper's system (section 2) answers a *query*, a user opening the store with their context,
by retrieving a short list of candidate apps and ranking them; each shown app is an *impression*
and the label is whether the user installed it (section 4.1). This module simulates that log:
one row per impression, written to Parquet, one folder a day. Every row also carries the
probability the ground truth assigned to the install, so models can be judged against the truth
and not only against sampled labels.

Ground truth
------------
The install probability of impression app ``a`` shown to user ``u`` in context ``x`` on day ``d``
is ``sigmoid(logit)`` where the logit is a sum of the effects below. Each is there because the
paper names the phenomenon; none is tuned to favour a model.

Memorisation (the wide part's target). A fraction of apps (``companion_app_fraction``) each have
one to ``max_companions`` specific companion apps, drawn from every category in proportion to
their popularity, so the pairs cross categories and cannot be explained by them. If the user
already has companion ``c`` of ``a`` installed, the logit moves by the pair's own effect: mostly
positive (apps used together, the paper's netflix/pandora), a share ``substitute_share`` negative
(competitors). The user-by-app matrix these pairs define is sparse and high-rank: exactly the
"exception rules" of section 1 that dense embeddings over-generalise.

Generalisation (the deep part's target). Each category ``c`` has a latent factor ``V_c`` and
each user a taste factor ``U_u`` (partly shared within a country), so the user's affinity to a
category is the low-rank product ``U_u . V_c``, weighted by ``taste_weight``. The logs never show
the taste; they show its traces: a share ``taste_share`` of the apps a user had installed before
day one was chosen by category from that taste, the rest by popularity alone. Installed apps
therefore carry signal about which categories a user likes.

Popularity and context. Each app has a latent quality that adds ``quality_weight * quality``;
its rating is a noisy view of the quality and its install count grows with a latent daily install
rate that also rises with quality, so both observable features are correlated with the truth but
neither is it. Small context effects per category, of scale about ``context_scale``: hour of
day (a smooth daily cycle with a category-specific phase), device class, country, gender, age (a
slope per category) and weekend. Newly released apps get a freshness boost that decays with a
time constant of ``freshness_days``. Each user has an overall install propensity. An app the user
already has gets ``already_installed_effect`` (people rarely install an app twice). The intercept
is solved once per world so that the expected install rate of day one is ``base_rate``.

Retrieval. Each query shows ``min_candidates`` to ``max_candidates`` apps, mixed in the shares
``retrieval_mix``: the popularity chart (weight installs ** 0.6), apps from the category of one
of the user's installed apps (weight (installs + 1) ** 0.3 within the category), and apps drawn
uniformly from the catalogue (exploration, which is how new apps get seen). Installed apps are filtered out except for a share ``installed_candidate_keep``, and an
app appears at most once per query.

Dynamics. The catalogue grows: every day after the first, ``new_app_fraction`` times the initial
catalogue size is released, with zero installs and app age zero. Apps installed on a day join the
user's installed set from the next day on (``AppStoreWorld.end_day``), so installed lists grow.

Determinism
-----------
The world (users, apps, pairs, effects) is a pure function of ``SimulatorSettings``; each day's
block of new apps comes from its own seeded stream, so asking about day 10 never changes day 3.
The only mutable state is the users' installed sets, advanced by ``end_day``. The logs of a day
come from a stream seeded with ``(seed, day)``; the same settings, seed and ``chunk_rows`` give
identical files.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from transform.errors import ArtifactError, OutputExistsError, UsageError

__all__ = [
    "CATEGORY_NAMES",
    "COUNTRIES",
    "DEVICES",
    "GENDERS",
    "IMPRESSION_SCHEMA",
    "METADATA_FILE",
    "STATE_FILE",
    "AppCatalog",
    "AppStoreWorld",
    "Impressions",
    "SimulationSummary",
    "SimulatorSettings",
    "simulate",
]

# (ISO code, primary language, secondary language), ordered by Zipf rank.
COUNTRIES: tuple[tuple[str, str, str], ...] = (
    ("US", "en", "es"),
    ("IN", "hi", "en"),
    ("BR", "pt", "en"),
    ("ID", "id", "en"),
    ("RU", "ru", "en"),
    ("MX", "es", "en"),
    ("JP", "ja", "en"),
    ("DE", "de", "en"),
    ("GB", "en", "pl"),
    ("FR", "fr", "en"),
    ("TR", "tr", "en"),
    ("KR", "ko", "en"),
    ("IT", "it", "en"),
    ("ES", "es", "ca"),
    ("VN", "vi", "en"),
    ("PH", "tl", "en"),
    ("TH", "th", "en"),
    ("EG", "ar", "en"),
    ("PK", "ur", "en"),
    ("NG", "en", "yo"),
    ("CA", "en", "fr"),
    ("AU", "en", "zh"),
    ("PL", "pl", "en"),
    ("AR", "es", "en"),
    ("SA", "ar", "en"),
    ("UA", "uk", "ru"),
    ("CO", "es", "en"),
    ("NL", "nl", "en"),
    ("MY", "ms", "en"),
    ("ZA", "en", "af"),
)
DEVICES: tuple[str, ...] = (
    "android_phone_low",
    "android_phone_mid",
    "android_phone_high",
    "android_tablet",
)
GENDERS: tuple[str, ...] = ("f", "m", "u")
CATEGORY_NAMES: tuple[str, ...] = (
    "art_design",
    "auto_vehicles",
    "beauty",
    "books_reference",
    "business",
    "comics",
    "communication",
    "dating",
    "education",
    "entertainment",
    "events",
    "finance",
    "food_drink",
    "health_fitness",
    "house_home",
    "lifestyle",
    "maps_navigation",
    "medical",
    "music_audio",
    "news_magazines",
    "parenting",
    "personalization",
    "photography",
    "productivity",
    "shopping",
    "social",
    "sports",
    "tools",
    "travel_local",
    "video_players",
    "weather",
    "game_action",
    "game_arcade",
    "game_casual",
    "game_puzzle",
    "game_racing",
    "game_role_playing",
    "game_simulation",
    "game_strategy",
    "game_word",
)

IMPRESSION_SCHEMA: pa.Schema = pa.schema(
    [
        ("query_id", pa.string()),
        ("user_id", pa.string()),
        ("country", pa.string()),
        ("language", pa.string()),
        ("gender", pa.string()),
        ("user_age", pa.int64()),
        ("installed_apps", pa.list_(pa.string())),
        ("device", pa.string()),
        ("hour", pa.int64()),
        ("day_of_week", pa.int64()),
        ("impression_app", pa.string()),
        ("app_category", pa.string()),
        ("app_age_days", pa.int64()),
        ("app_rating", pa.float64()),
        ("app_installs", pa.int64()),
        ("installed", pa.int64()),
        ("true_probability", pa.float64()),
    ]
)

METADATA_FILE = "simulation.json"
STATE_FILE = "world_state.npz"
_FORMAT_VERSION = 1
_DAY_DIR = re.compile(r"^day=\d+$")

# Installed sets are kept as sorted int64 keys (owner << 32 | app) so membership of a whole
# chunk of (owner, app) pairs is one searchsorted call.
_KEY_SHIFT = 32
# Independent random streams derived from the seed; changing one never shifts another.
_STREAM_WORLD = 0
_STREAM_LOGS = 1
_STREAM_CALIBRATION = 2
_STREAM_NEW_APPS = 3
_CALIBRATION_ROWS = 20_000
_DEVICE_SWITCH = 0.1  # share of queries made from a device other than the user's usual one
_POPULAR_POWER = 0.6
_CATEGORY_POWER = 0.3


@dataclass(frozen=True)
class SimulatorSettings:
    """Everything that defines a simulated world. Defaults give a mid-sized store.

    Attributes:
        seed: seed of every random stream of the world and of the logs.
        num_users: number of users.
        num_apps: size of the catalogue on day one.
        num_categories: number of app categories.
        taste_dim: rank of the user-taste x category-factor product (generalisation).
        new_app_fraction: apps released each day after the first, as a share of ``num_apps``.
        mean_installed: mean number of apps a user has installed before day one.
        max_installed: cap on that number.
        taste_share: share of those installs chosen by category taste (the rest by popularity).
        companion_app_fraction: share of apps that have companion apps (memorisation pairs).
        max_companions: most companions one app can have.
        companion_effect: typical absolute logit effect of a companion pair.
        substitute_share: share of pairs whose effect is negative.
        min_candidates: fewest candidates retrieved for a query.
        max_candidates: most candidates retrieved for a query.
        retrieval_mix: shares of candidates from (popularity chart, installed category, uniform).
        installed_candidate_keep: share of already-installed candidates retrieval lets through.
        base_rate: expected install rate of day one; the intercept is solved for it.
        taste_weight: logit weight of the user-category affinity.
        quality_weight: logit weight of app quality.
        context_scale: scale of the small context-by-category effects.
        user_bias_scale: spread of the users' overall install propensity.
        freshness_weight: logit boost of an app on its release day.
        freshness_days: time constant of that boost's decay.
        already_installed_effect: logit effect of showing an app the user already has.
        country_zipf: Zipf exponent of the country distribution.
        start_day_of_week: day of week of day one (0 = Monday).
    """

    seed: int = 0
    num_users: int = 50_000
    num_apps: int = 5_000
    num_categories: int = 40
    taste_dim: int = 8
    new_app_fraction: float = 0.02
    mean_installed: float = 8.0
    max_installed: int = 40
    taste_share: float = 0.6
    companion_app_fraction: float = 0.3
    max_companions: int = 3
    companion_effect: float = 2.0
    substitute_share: float = 0.2
    min_candidates: int = 5
    max_candidates: int = 20
    retrieval_mix: tuple[float, float, float] = (0.4, 0.35, 0.25)
    installed_candidate_keep: float = 0.05
    base_rate: float = 0.10
    taste_weight: float = 1.0
    quality_weight: float = 0.8
    context_scale: float = 0.3
    user_bias_scale: float = 0.4
    freshness_weight: float = 0.5
    freshness_days: float = 14.0
    already_installed_effect: float = -3.0
    country_zipf: float = 1.1
    start_day_of_week: int = 0

    def __post_init__(self) -> None:
        # JSON round trips turn the tuple into a list; keep the frozen value hashable.
        object.__setattr__(self, "retrieval_mix", tuple(float(x) for x in self.retrieval_mix))
        for name in ("num_users", "num_apps", "num_categories", "taste_dim", "max_companions"):
            _require_int(name, getattr(self, name), minimum=1)
        _require_int("seed", self.seed, minimum=0)
        _require_int("max_installed", self.max_installed, minimum=0)
        _require_int("min_candidates", self.min_candidates, minimum=1)
        _require_int("max_candidates", self.max_candidates, minimum=self.min_candidates)
        _require_int("start_day_of_week", self.start_day_of_week, minimum=0, maximum=6)
        if self.num_apps < self.num_categories:
            raise UsageError(
                f"num_apps ({self.num_apps}) must be at least num_categories "
                f"({self.num_categories}) so that every category has an app"
            )
        for name in (
            "new_app_fraction",
            "taste_share",
            "companion_app_fraction",
            "substitute_share",
            "installed_candidate_keep",
        ):
            _require_fraction(name, getattr(self, name))
        if not 0.0 < self.base_rate < 1.0:
            raise UsageError(f"base_rate must be strictly between 0 and 1, got {self.base_rate}")
        for name in ("mean_installed", "freshness_days"):
            if not getattr(self, name) > 0:
                raise UsageError(f"{name} must be positive, got {getattr(self, name)}")
        for name in (
            "companion_effect",
            "taste_weight",
            "quality_weight",
            "context_scale",
            "user_bias_scale",
            "freshness_weight",
            "country_zipf",
        ):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise UsageError(f"{name} must be finite and >= 0, got {getattr(self, name)}")
        if not math.isfinite(self.already_installed_effect):
            raise UsageError("already_installed_effect must be finite")
        mix = self.retrieval_mix
        if len(mix) != 3 or any(not math.isfinite(x) or x < 0 for x in mix) or sum(mix) <= 0:
            raise UsageError(
                "retrieval_mix must be three non-negative shares (popular, category, random) "
                f"with a positive sum, got {mix}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of the settings."""
        out = asdict(self)
        out["retrieval_mix"] = list(self.retrieval_mix)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SimulatorSettings:
        """Settings from ``to_dict`` output; unknown keys are refused by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(f"unknown simulator settings: {', '.join(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class AppCatalog:
    """The apps available on one day. App ``i`` of the world is row ``i`` (ids grow by day)."""

    day: int
    app_id: pa.StringArray
    category: np.ndarray
    category_name: pa.StringArray
    release_day: np.ndarray
    age_days: np.ndarray
    rating: np.ndarray
    installs: np.ndarray

    @property
    def num_apps(self) -> int:
        """Number of apps released on or before ``day``."""
        return len(self.category)


@dataclass(frozen=True)
class Impressions:
    """A chunk of impressions in index form (users, apps and devices as integer indices).

    Rows of one query are contiguous and share ``query``, ``user``, ``hour``, ``device`` and
    installed apps. ``installed_offsets`` (length rows + 1) and ``installed_apps`` are the
    per-row installed lists in CSR form.
    """

    day: int
    query: np.ndarray
    user: np.ndarray
    hour: np.ndarray
    device: np.ndarray
    app: np.ndarray
    installed_offsets: np.ndarray
    installed_apps: np.ndarray
    probability: np.ndarray
    label: np.ndarray

    @property
    def num_rows(self) -> int:
        """Number of impressions in the chunk."""
        return len(self.app)


@dataclass(frozen=True)
class SimulationSummary:
    """What ``simulate`` wrote."""

    out_dir: Path
    days: int
    rows: int
    label_rate: float
    rows_per_day: tuple[int, ...]
    label_rate_per_day: tuple[float, ...]
    apps_per_day: tuple[int, ...]
    files: tuple[Path, ...]
    metadata_path: Path
    seconds: float


@dataclass(frozen=True)
class _DayTables:
    """Per-day quantities shared by every chunk of the day."""

    day: int
    num_apps: int
    installs: np.ndarray
    popular_cdf: np.ndarray
    category_sampler: _GroupedSampler


class _GroupedSampler:
    """Draws one item per requested group, in proportion to item weights within the group.

    Within-group cumulative weights are normalised to (0, 1] and shifted by the group index, so a
    single sorted array serves every group and a whole batch is one searchsorted call.
    """

    def __init__(self, group: np.ndarray, weight: np.ndarray, num_groups: int) -> None:
        order = np.argsort(group, kind="stable")
        g = group[order]
        w = weight[order].astype(np.float64)
        cum = np.cumsum(w)
        totals = np.bincount(g, weights=w, minlength=num_groups)
        before = np.concatenate(([0.0], np.cumsum(totals)[:-1]))
        self._keys = g + (cum - before[g]) / totals[g]
        self._order = order

    def sample(self, groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One item index per entry of ``groups`` (each group must have an item)."""
        pos = np.searchsorted(self._keys, groups + rng.random(len(groups)), side="right")
        return self._order[np.minimum(pos, len(self._keys) - 1)]


class AppStoreWorld:
    """The hidden ground truth: users, apps, memorisation pairs and effects.

    Deterministic from ``settings``. The one piece of mutable state is the users' installed
    sets, which ``end_day`` advances with the installs of a simulated day.
    """

    def __init__(self, settings: SimulatorSettings) -> None:
        self.settings = settings
        s = settings
        rng = np.random.default_rng([s.seed, _STREAM_WORLD])
        n_cat = s.num_categories
        self.category_names: tuple[str, ...] = tuple(CATEGORY_NAMES[:n_cat]) + tuple(
            f"category_{i:02d}" for i in range(len(CATEGORY_NAMES), n_cat)
        )
        self._category_name_array = pa.array(self.category_names, pa.string())
        self._country_codes = pa.array([c[0] for c in COUNTRIES], pa.string())
        languages = sorted({lang for c in COUNTRIES for lang in c[1:]})
        self._language_names = pa.array(languages, pa.string())
        lang_index = {lang: i for i, lang in enumerate(languages)}
        self._device_names = pa.array(DEVICES, pa.string())
        self._gender_names = pa.array(GENDERS, pa.string())

        # Categories: Zipf-like popularity in a random order, and low-rank factors.
        self._category_prior = _normalise(1.0 / rng.permutation(np.arange(1, n_cat + 1)) ** 0.8)
        self._category_factor = rng.normal(0.0, 1.0, (n_cat, s.taste_dim))

        # Users.
        n_users = s.num_users
        n_countries = len(COUNTRIES)
        country_weight = _normalise(1.0 / np.arange(1, n_countries + 1) ** s.country_zipf)
        self.user_country = _draw(np.cumsum(country_weight), rng, n_users)
        primary = np.array([lang_index[c[1]] for c in COUNTRIES])
        secondary = np.array([lang_index[c[2]] for c in COUNTRIES])
        self.user_language = np.where(
            rng.random(n_users) < 0.8, primary[self.user_country], secondary[self.user_country]
        )
        self.user_gender = _draw(np.cumsum([0.47, 0.47, 0.06]), rng, n_users)
        self.user_age = np.clip(13 + rng.gamma(2.5, 8.0, n_users), 13, 80).astype(np.int64)
        # Richer countries skew to high-end phones and tablets.
        wealth = rng.normal(0.0, 1.0, n_countries)[self.user_country]
        device_logits = np.stack([-wealth, np.zeros(n_users), wealth, 0.5 * wealth - 1.0], 1)
        self.user_device = _categorical_rows(_softmax(device_logits), rng)
        country_taste = rng.normal(0.0, 1.0, (n_countries, s.taste_dim))
        # Taste is partly shared within a country so country features carry some of it.
        self._user_taste = (
            math.sqrt(0.3) * country_taste[self.user_country]
            + math.sqrt(0.7) * rng.normal(0.0, 1.0, (n_users, s.taste_dim))
        ) / math.sqrt(s.taste_dim)
        self._user_bias = rng.normal(0.0, s.user_bias_scale, n_users)
        self._activity_cdf = np.cumsum(rng.lognormal(0.0, 1.0, n_users))

        # Context effects by category.
        c = s.context_scale
        hours = np.arange(24)[:, None]
        phase = rng.uniform(0.0, 24.0, n_cat)
        self._hour_effect = rng.normal(0.0, c, n_cat) * np.cos(2 * np.pi * (hours - phase) / 24)
        self._device_effect = rng.normal(0.0, c, (len(DEVICES), n_cat))
        self._country_effect = rng.normal(0.0, c, (n_countries, n_cat))
        self._gender_effect = rng.normal(0.0, c / 2, (len(GENDERS), n_cat))
        self._age_slope = rng.normal(0.0, c, n_cat)
        self._weekend_effect = rng.normal(0.0, c / 2, (2, n_cat))
        self._hour_cdf = np.cumsum(np.exp(0.8 * np.cos(2 * np.pi * (np.arange(24) - 20) / 24)))

        self._user_ids = pc.binary_join_element_wise(
            "u", pc.utf8_lpad(pc.cast(pa.array(np.arange(n_users)), pa.string()), 7, "0"), ""
        )

        # Apps of day one; later days are appended by _ensure_day.
        self._apps_per_new_day = round(s.num_apps * s.new_app_fraction)
        self._app_category = np.zeros(0, np.int64)
        self._app_quality = np.zeros(0)
        self._app_rate = np.zeros(0)
        self._app_release = np.zeros(0, np.int64)
        self._app_rating = np.zeros(0)
        self._companion_offsets = np.zeros(1, np.int64)
        self._companion_app = np.zeros(0, np.int64)
        self._companion_effect = np.zeros(0)
        self._days_built = 0
        self._app_block(rng, s.num_apps, release_day=None)
        self._days_built = 1
        self._app_ids = self._format_app_ids(self.num_apps_on(1))
        self._tables: _DayTables | None = None

        self.last_day = 0
        self._set_installed_keys(self._initial_installed(rng))
        self._intercept = 0.0
        self._intercept = self._solve_intercept()

    # --------------------------------------------------------------------------- construction

    def _app_block(self, rng: np.random.Generator, n: int, release_day: int | None) -> None:
        """Append ``n`` apps released on ``release_day`` (``None``: the day-one catalogue)."""
        s = self.settings
        n_cat = s.num_categories
        prior_cdf = np.cumsum(self._category_prior)
        if release_day is None:
            # Every category gets at least one app so category-matched retrieval always works.
            category = rng.permutation(
                np.concatenate([np.arange(n_cat), _draw(prior_cdf, rng, n - n_cat)])
            )
            age = np.clip(np.exp(rng.normal(math.log(400.0), 1.0, n)), 1, 3000).astype(np.int64)
            release = 1 - age
        else:
            category = _draw(prior_cdf, rng, n)
            release = np.full(n, release_day, np.int64)
        quality = rng.normal(0.0, 1.0, n)
        # A wide lognormal gives the concentrated installed base of real stores: a few apps on
        # most phones, a long tail on few.
        rate = np.exp(1.0 + 1.5 * quality + rng.normal(0.0, 1.5, n))
        rating = np.clip(np.round(3.9 + 0.45 * quality + rng.normal(0.0, 0.35, n), 1), 1.0, 5.0)

        first = len(self._app_category)
        self._app_category = np.concatenate([self._app_category, category])
        self._app_quality = np.concatenate([self._app_quality, quality])
        self._app_rate = np.concatenate([self._app_rate, rate])
        self._app_release = np.concatenate([self._app_release, release])
        self._app_rating = np.concatenate([self._app_rating, rating])

        # Companions come from apps already in the store, in proportion to popularity and
        # regardless of category: the pairs must not be explainable by categories. Weighting by
        # the install rate makes companions the apps users actually have, so pairs are observed.
        pool_cdf = np.cumsum(self._app_rate[: first + n if release_day is None else first])
        has = rng.random(n) < s.companion_app_fraction
        count = np.where(has, rng.integers(1, s.max_companions + 1, n), 0)
        target = np.repeat(np.arange(first, first + n), count)
        companion = _draw(pool_cdf, rng, len(target))
        sign = np.where(rng.random(len(target)) < s.substitute_share, -1.0, 1.0)
        effect = sign * s.companion_effect * np.exp(rng.normal(0.0, 0.3, len(target)))
        keep = target != companion
        target, companion, effect = target[keep], companion[keep], effect[keep]
        _, uniq = np.unique(target * (first + n) + companion, return_index=True)
        target, companion, effect = target[uniq], companion[uniq], effect[uniq]
        counts = np.bincount(target - first, minlength=n)
        self._companion_offsets = np.concatenate(
            [self._companion_offsets, self._companion_offsets[-1] + np.cumsum(counts)]
        )
        self._companion_app = np.concatenate([self._companion_app, companion])
        self._companion_effect = np.concatenate([self._companion_effect, effect])

    def _ensure_day(self, day: int) -> None:
        """Release the apps of every day up to ``day``, each from its own seeded stream."""
        if day <= self._days_built:
            return
        for d in range(self._days_built + 1, day + 1):
            rng = np.random.default_rng([self.settings.seed, _STREAM_NEW_APPS, d])
            self._app_block(rng, self._apps_per_new_day, release_day=d)
            self._days_built = d
        self._app_ids = self._format_app_ids(len(self._app_category))

    @staticmethod
    def _format_app_ids(n: int) -> pa.StringArray:
        digits = pc.utf8_lpad(pc.cast(pa.array(np.arange(n)), pa.string()), 6, "0")
        return pc.binary_join_element_wise("a", digits, "")

    def _initial_installed(self, rng: np.random.Generator) -> np.ndarray:
        """Installed sets before day one, partly from category taste, partly from popularity."""
        s = self.settings
        n_users = s.num_users
        lam = s.mean_installed * np.exp(0.6 * rng.normal(0.0, 1.0, n_users) - 0.18)
        count = np.minimum(rng.poisson(lam), s.max_installed)
        owner = np.repeat(np.arange(n_users), count)
        n_day1 = self.num_apps_on(1)
        weight = self._app_rate[:n_day1]
        app = _draw(np.cumsum(weight), rng, len(owner))
        by_taste = rng.random(len(owner)) < s.taste_share
        taste_probs = self._category_prior * np.exp(
            s.taste_weight * self._user_taste @ self._category_factor.T
        )
        taste = _GroupedSampler(
            np.repeat(np.arange(n_users), s.num_categories), taste_probs.ravel(), n_users
        )
        category = taste.sample(owner[by_taste], rng) % s.num_categories
        within = _GroupedSampler(self._app_category[:n_day1], weight, s.num_categories)
        app[by_taste] = within.sample(category, rng)
        return np.unique((owner.astype(np.int64) << _KEY_SHIFT) | app)

    def _set_installed_keys(self, keys: np.ndarray) -> None:
        self._installed_keys = keys
        self._installed_offsets = np.searchsorted(
            keys >> _KEY_SHIFT, np.arange(self.settings.num_users + 1)
        ).astype(np.int64)
        self._installed_flat = keys & ((1 << _KEY_SHIFT) - 1)

    def _solve_intercept(self) -> float:
        """Intercept making the expected install rate of day one equal ``base_rate``."""
        rng = np.random.default_rng([self.settings.seed, _STREAM_CALIBRATION])
        imp = self._sample_chunk(1, _CALIBRATION_ROWS, rng, 0)
        logit = self._logit(
            1, imp.user, imp.app, imp.hour, imp.device, imp.user, self._installed_keys
        )
        lo, hi = -30.0, 30.0
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            if _sigmoid(logit + mid).mean() < self.settings.base_rate:
                lo = mid
            else:
                hi = mid
        return 0.5 * (lo + hi)

    # ------------------------------------------------------------------------- public API

    @classmethod
    def from_dir(cls, out_dir: str | Path) -> AppStoreWorld:
        """Rebuild the world of a finished ``simulate`` run, installed sets as after its last day."""
        out = Path(out_dir)
        meta_path = out / METADATA_FILE
        if not meta_path.is_file():
            raise ArtifactError(f"{meta_path} not found: not a finished simulation folder")
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != _FORMAT_VERSION:
            raise UsageError(
                f"{meta_path} has format_version {meta.get('format_version')!r}, "
                f"this simulator reads {_FORMAT_VERSION}"
            )
        world = cls(SimulatorSettings.from_dict(meta["settings"]))
        with np.load(out / STATE_FILE) as state:
            world._set_installed_keys(state["installed_keys"].astype(np.int64))
        world.last_day = int(meta["days"])
        world._ensure_day(world.last_day)
        return world

    def num_apps_on(self, day: int) -> int:
        """Number of apps released on or before ``day`` (ids 0 .. n-1)."""
        _require_int("day", day, minimum=1)
        return self.settings.num_apps + (day - 1) * self._apps_per_new_day

    def day_of_week(self, day: int) -> int:
        """Day of week (0 = Monday) of simulation day ``day``."""
        return (self.settings.start_day_of_week + day - 1) % 7

    def catalog(self, day: int) -> AppCatalog:
        """The apps available on ``day`` with their observable attributes."""
        tables = self._day_tables(day)
        n = tables.num_apps
        category = self._app_category[:n].copy()
        return AppCatalog(
            day=day,
            app_id=self._app_ids.slice(0, n),
            category=category,
            category_name=self._category_name_array.take(category),
            release_day=self._app_release[:n].copy(),
            age_days=day - self._app_release[:n],
            rating=self._app_rating[:n].copy(),
            installs=tables.installs.copy(),
        )

    def memorisation_pairs(self, day: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All (impression app, companion app, logit effect) pairs of apps released by ``day``."""
        n = self.num_apps_on(day)
        self._ensure_day(day)
        end = self._companion_offsets[n]
        target = np.repeat(np.arange(n), np.diff(self._companion_offsets[: n + 1]))
        return target, self._companion_app[:end].copy(), self._companion_effect[:end].copy()

    def installed_sets(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Current installed apps of ``users`` as CSR (offsets of length len(users)+1, apps)."""
        users = np.asarray(users, np.int64)
        _check_range("users", users, self.settings.num_users)
        return ragged_gather(self._installed_offsets, self._installed_flat, users)

    def end_day(self, day: int, users: np.ndarray, apps: np.ndarray) -> None:
        """Close ``day``: apps installed on it join the users' installed sets from the next day."""
        if day != self.last_day + 1:
            raise UsageError(f"day must be {self.last_day + 1} (the next day), got {day}")
        users = np.asarray(users, np.int64)
        apps = np.asarray(apps, np.int64)
        if users.shape != apps.shape:
            raise UsageError("users and apps must have the same length")
        _check_range("users", users, self.settings.num_users)
        _check_range("apps", apps, self.num_apps_on(day))
        new = (users << _KEY_SHIFT) | apps
        self._set_installed_keys(np.union1d(self._installed_keys, new))
        self.last_day = day

    def true_probability(
        self,
        day: int,
        user: np.ndarray,
        app: np.ndarray,
        hour: np.ndarray,
        device: np.ndarray,
        installed_offsets: np.ndarray,
        installed_apps: np.ndarray,
    ) -> np.ndarray:
        """Ground-truth install probability of each impression.

        Args:
            day: simulation day (sets day of week and app ages).
            user, app, hour, device: one entry per impression (user, app and device indices).
            installed_offsets: CSR offsets (length impressions + 1) into ``installed_apps``.
            installed_apps: app indices the user has installed, per impression.
        """
        user, app, hour, device = (np.asarray(x, np.int64) for x in (user, app, hour, device))
        n = len(app)
        offsets = np.asarray(installed_offsets, np.int64)
        flat = np.asarray(installed_apps, np.int64)
        if not (len(user) == len(hour) == len(device) == n and len(offsets) == n + 1):
            raise UsageError(
                "user, app, hour and device must have one entry per impression and "
                "installed_offsets one more"
            )
        if n and (offsets[0] != 0 or offsets[-1] != len(flat) or np.any(np.diff(offsets) < 0)):
            raise UsageError("installed_offsets must rise from 0 to len(installed_apps)")
        n_apps = self.num_apps_on(day)
        _check_range("user", user, self.settings.num_users)
        _check_range("app", app, n_apps)
        _check_range("hour", hour, 24)
        _check_range("device", device, len(DEVICES))
        _check_range("installed_apps", flat, n_apps)
        self._ensure_day(day)
        owner = np.repeat(np.arange(n, dtype=np.int64), np.diff(offsets))
        keys = np.sort((owner << _KEY_SHIFT) | flat)
        logit = self._logit(day, user, app, hour, device, np.arange(n, dtype=np.int64), keys)
        return _sigmoid(logit)

    def true_probability_of_rows(self, rows: pa.Table | pa.RecordBatch, day: int) -> np.ndarray:
        """Ground-truth install probability of logged rows (columns as in IMPRESSION_SCHEMA)."""
        if isinstance(rows, pa.RecordBatch):
            rows = pa.Table.from_batches([rows])
        missing = [
            c
            for c in ("user_id", "impression_app", "hour", "device", "installed_apps")
            if c not in rows.column_names
        ]
        if missing:
            raise UsageError(f"rows lack columns: {', '.join(missing)}")
        user = _parse_ids(rows.column("user_id"), "user_id")
        app = _parse_ids(rows.column("impression_app"), "impression_app")
        device_col = pc.index_in(rows.column("device"), value_set=self._device_names)
        if device_col.null_count:
            raise UsageError(f"device holds values other than {', '.join(DEVICES)}")
        installed = rows.column("installed_apps")
        lengths = pc.list_value_length(installed).to_numpy(zero_copy_only=False)
        offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
        flat = _parse_ids(pc.list_flatten(installed), "installed_apps")
        return self.true_probability(
            day,
            user,
            app,
            rows.column("hour").to_numpy(),
            device_col.to_numpy(zero_copy_only=False),
            offsets,
            flat,
        )

    def iter_impressions(
        self, day: int, num_rows: int, rng: np.random.Generator, chunk_rows: int = 65_536
    ) -> Iterator[Impressions]:
        """Stream exactly ``num_rows`` impressions of ``day`` in chunks of at most ``chunk_rows``.

        Queries use the installed sets as they are now (start of the day). A query cut by a
        chunk boundary simply shows fewer apps; query ids stay unique within the day.
        """
        _require_int("day", day, minimum=1)
        _require_int("num_rows", num_rows, minimum=1)
        _require_int("chunk_rows", chunk_rows, minimum=1)
        next_query = 0
        done = 0
        while done < num_rows:
            need = min(chunk_rows, num_rows - done)
            chunk = self._sample_chunk(day, need, rng, next_query)
            next_query = int(chunk.query[-1]) + 1
            done += need
            yield chunk

    def sample_queries(
        self, day: int, num_rows: int, rng: np.random.Generator, chunk_rows: int = 65_536
    ) -> Iterator[pa.RecordBatch]:
        """Stream ``num_rows`` impression rows of ``day`` as record batches of IMPRESSION_SCHEMA."""
        for chunk in self.iter_impressions(day, num_rows, rng, chunk_rows):
            yield self.to_record_batch(chunk)

    def to_record_batch(self, imp: Impressions) -> pa.RecordBatch:
        """The logged features of a chunk of impressions, as a record batch of IMPRESSION_SCHEMA."""
        day = imp.day
        tables = self._day_tables(day)
        n = imp.num_rows
        user, app = imp.user, imp.app
        query_id = pc.binary_join_element_wise(
            f"d{day:03d}-q", pc.utf8_lpad(pc.cast(pa.array(imp.query), pa.string()), 8, "0"), ""
        )
        installed = pa.ListArray.from_arrays(
            pa.array(imp.installed_offsets.astype(np.int32)),
            self._app_ids.take(imp.installed_apps),
        )
        arrays = [
            query_id,
            self._user_ids.take(user),
            self._country_codes.take(self.user_country[user]),
            self._language_names.take(self.user_language[user]),
            self._gender_names.take(self.user_gender[user]),
            pa.array(self.user_age[user]),
            installed,
            self._device_names.take(imp.device),
            pa.array(imp.hour.astype(np.int64)),
            pa.array(np.full(n, self.day_of_week(day), np.int64)),
            self._app_ids.take(app),
            self._category_name_array.take(self._app_category[app]),
            pa.array(day - self._app_release[app]),
            pa.array(self._app_rating[app]),
            pa.array(tables.installs[app]),
            pa.array(imp.label.astype(np.int64)),
            pa.array(imp.probability.astype(np.float64)),
        ]
        return pa.RecordBatch.from_arrays(arrays, schema=IMPRESSION_SCHEMA)

    # ---------------------------------------------------------------------------- hot path

    def _day_tables(self, day: int) -> _DayTables:
        _require_int("day", day, minimum=1)
        if self._tables is not None and self._tables.day == day:
            return self._tables
        self._ensure_day(day)
        n = self.num_apps_on(day)
        installs = np.round(self._app_rate[:n] * (day - self._app_release[:n])).astype(np.int64)
        self._tables = _DayTables(
            day=day,
            num_apps=n,
            installs=installs,
            # +1 keeps new apps (zero installs) reachable inside their category.
            popular_cdf=np.cumsum(installs.astype(np.float64) ** _POPULAR_POWER),
            category_sampler=_GroupedSampler(
                self._app_category[:n],
                (installs + 1.0) ** _CATEGORY_POWER,
                self.settings.num_categories,
            ),
        )
        return self._tables

    def _sample_chunk(
        self, day: int, need: int, rng: np.random.Generator, first_query: int
    ) -> Impressions:
        """Exactly ``need`` impressions from consecutive queries numbered from ``first_query``."""
        s = self.settings
        tables = self._day_tables(day)
        mean_k = 0.5 * (s.min_candidates + s.max_candidates)
        parts: list[tuple[np.ndarray, ...]] = []
        total = 0
        query_base = first_query
        while total < need:
            n_q = math.ceil((need - total) / (0.85 * mean_k)) + 1
            q, user, hour, device, app = self._retrieve(n_q, rng, tables)
            parts.append((q + query_base, user, hour, device, app))
            query_base += n_q
            total += len(app)
        q_row, user_q, hour_q, device_q, app = (
            np.concatenate(p)[:need] for p in zip(*parts, strict=False)
        )
        offsets, flat = ragged_gather(self._installed_offsets, self._installed_flat, user_q)
        logit = self._logit(day, user_q, app, hour_q, device_q, user_q, self._installed_keys)
        probability = _sigmoid(logit)
        label = (rng.random(need) < probability).astype(np.int64)
        return Impressions(
            day=day,
            query=q_row,
            user=user_q,
            hour=hour_q,
            device=device_q,
            app=app,
            installed_offsets=offsets,
            installed_apps=flat,
            probability=probability,
            label=label,
        )

    def _retrieve(
        self, n_q: int, rng: np.random.Generator, tables: _DayTables
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Draw ``n_q`` queries and their candidate apps; arrays are per candidate row."""
        s = self.settings
        user = _draw(self._activity_cdf, rng, n_q)
        hour = _draw(self._hour_cdf, rng, n_q)
        device = np.where(
            rng.random(n_q) < _DEVICE_SWITCH,
            rng.integers(0, len(DEVICES), n_q),
            self.user_device[user],
        )
        k = rng.integers(s.min_candidates, s.max_candidates + 1, n_q)
        q = np.repeat(np.arange(n_q, dtype=np.int64), k)
        m = len(q)
        source = _draw(np.cumsum(s.retrieval_mix), rng, m)
        app = np.empty(m, np.int64)

        popular = source == 0
        app[popular] = _draw(tables.popular_cdf, rng, int(popular.sum()))

        by_category = np.flatnonzero(source == 1)
        cand_user = user[q[by_category]]
        start = self._installed_offsets[cand_user]
        length = self._installed_offsets[cand_user + 1] - start
        pick = start + np.floor(rng.random(len(by_category)) * length).astype(np.int64)
        has_installed = length > 0
        # Users with nothing installed get the category the store pushes most.
        fallback = _draw(np.cumsum(self._category_prior), rng, len(by_category))
        seed_app = self._installed_flat[np.minimum(pick, len(self._installed_flat) - 1)]
        category = np.where(has_installed, self._app_category[seed_app], fallback)
        app[by_category] = tables.category_sampler.sample(category, rng)

        uniform = source == 2
        app[uniform] = rng.integers(0, tables.num_apps, int(uniform.sum()))

        row_user = user[q]
        already = _member(self._installed_keys, row_user, app)
        keep = ~already | (rng.random(m) < s.installed_candidate_keep)
        # First occurrence of each (query, app) in retrieval order.
        key = q * tables.num_apps + app
        _, first = np.unique(key, return_index=True)
        unique_mask = np.zeros(m, bool)
        unique_mask[first] = True
        rows = np.flatnonzero(keep & unique_mask)
        return q[rows], row_user[rows], hour[q[rows]], device[q[rows]], app[rows]

    def _logit(
        self,
        day: int,
        user: np.ndarray,
        app: np.ndarray,
        hour: np.ndarray,
        device: np.ndarray,
        owner: np.ndarray,
        installed_keys: np.ndarray,
    ) -> np.ndarray:
        """The ground-truth logit; ``owner`` keys each row into the sorted ``installed_keys``."""
        s = self.settings
        cat = self._app_category[app]
        affinity = np.einsum("ij,ij->i", self._user_taste[user], self._category_factor[cat])
        age = day - self._app_release[app]
        weekend = int(self.day_of_week(day) >= 5)
        logit = (
            self._intercept
            + self._user_bias[user]
            + s.quality_weight * self._app_quality[app]
            + s.taste_weight * affinity
            + self._hour_effect[hour, cat]
            + self._device_effect[device, cat]
            + self._country_effect[self.user_country[user], cat]
            + self._gender_effect[self.user_gender[user], cat]
            + self._age_slope[cat] * ((self.user_age[user] - 35.0) / 15.0)
            + self._weekend_effect[weekend, cat]
            + s.freshness_weight * np.exp(-age / s.freshness_days)
        )
        logit += s.already_installed_effect * _member(installed_keys, owner, app)

        start = self._companion_offsets[app]
        count = self._companion_offsets[app + 1] - start
        row = np.repeat(np.arange(len(app)), count)
        pair = np.repeat(start - np.concatenate(([0], np.cumsum(count)[:-1])), count) + np.arange(
            len(row)
        )
        present = _member(installed_keys, owner[row], self._companion_app[pair])
        logit += np.bincount(
            row, weights=self._companion_effect[pair] * present, minlength=len(app)
        )
        return logit


# ------------------------------------------------------------------------------- simulate


def simulate(
    out_dir: str | Path,
    days: int,
    rows_per_day: int,
    seed: int | None = None,
    settings: SimulatorSettings | None = None,
    chunk_rows: int = 65_536,
    shard_rows: int = 262_144,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> SimulationSummary:
    """Write ``days`` days of simulated impression logs under ``out_dir``.

    Layout: ``out_dir/day=001/part-00000.parquet`` ... (shards of at most ``shard_rows`` rows,
    row groups of at most ``chunk_rows``), then ``world_state.npz`` (installed sets after the
    last day) and ``simulation.json`` (settings, per-day rows, label rate, catalogue size,
    files). ``simulation.json`` is written last, so its presence marks a finished run.

    Args:
        out_dir: folder to write into; created if missing.
        days: number of days (>= 1).
        rows_per_day: impressions per day (>= 1), exact.
        seed: overrides ``settings.seed`` when given.
        settings: the world; defaults to ``SimulatorSettings()``.
        chunk_rows: rows generated and written at a time; bounds memory.
        shard_rows: most rows in one Parquet file.
        overwrite: replace existing ``day=*`` folders instead of refusing.
        progress: called with one line of text per finished day.

    Raises:
        ValueError: an argument is out of range (the message names it).
        FileExistsError: ``out_dir`` already holds day folders and ``overwrite`` is false.
    """
    started = time.perf_counter()
    _require_int("days", days, minimum=1)
    _require_int("rows_per_day", rows_per_day, minimum=1)
    _require_int("chunk_rows", chunk_rows, minimum=1)
    _require_int("shard_rows", shard_rows, minimum=1)
    settings = settings if settings is not None else SimulatorSettings()
    if seed is not None:
        _require_int("seed", seed, minimum=0)
        settings = replace(settings, seed=seed)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a folder")
    existing = (
        sorted(p for p in out.iterdir() if p.is_dir() and _DAY_DIR.match(p.name))
        if out.is_dir()
        else []
    )
    if existing and not overwrite:
        raise OutputExistsError(
            f"{out} already holds simulated days ({existing[0].name}"
            f"{', ...' if len(existing) > 1 else ''}); pass --overwrite to replace them"
        )
    # Build the world before removing anything, so bad settings never cost existing data.
    world = AppStoreWorld(settings)
    for path in existing:
        shutil.rmtree(path)
    for name in (METADATA_FILE, STATE_FILE):
        if overwrite and (out / name).is_file():
            (out / name).unlink()
    out.mkdir(parents=True, exist_ok=True)

    files: list[Path] = []
    per_day: list[dict[str, Any]] = []
    for day in range(1, days + 1):
        day_started = time.perf_counter()
        stats = _write_day(world, out, day, rows_per_day, chunk_rows, shard_rows)
        files.extend(out / f for f in stats["files"])
        per_day.append(stats)
        if progress is not None:
            progress(
                f"day {day}/{days}: {rows_per_day:,} rows, {stats['queries']:,} queries, "
                f"label rate {stats['label_rate']:.4f}, {stats['num_apps']:,} apps, "
                f"{time.perf_counter() - day_started:.1f} s"
            )

    total_rows = days * rows_per_day
    label_rate = sum(d["label_rate"] for d in per_day) / days
    # Written via a temporary name and renamed, so a reader never sees a half-written file.
    state_tmp = out / (STATE_FILE + ".tmp.npz")
    np.savez_compressed(state_tmp, installed_keys=world._installed_keys)
    os.replace(state_tmp, out / STATE_FILE)
    meta = {
        "format_version": _FORMAT_VERSION,
        "settings": settings.to_dict(),
        "days": days,
        "rows_per_day": rows_per_day,
        "chunk_rows": chunk_rows,
        "shard_rows": shard_rows,
        "rows": total_rows,
        "label_rate": label_rate,
        "intercept": world._intercept,
        "schema": {f.name: str(f.type) for f in IMPRESSION_SCHEMA},
        "per_day": per_day,
    }
    meta_path = out / METADATA_FILE
    meta_tmp = out / (METADATA_FILE + ".tmp")
    meta_tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(meta_tmp, meta_path)
    return SimulationSummary(
        out_dir=out,
        days=days,
        rows=total_rows,
        label_rate=label_rate,
        rows_per_day=tuple(d["rows"] for d in per_day),
        label_rate_per_day=tuple(d["label_rate"] for d in per_day),
        apps_per_day=tuple(d["num_apps"] for d in per_day),
        files=tuple(files),
        metadata_path=meta_path,
        seconds=time.perf_counter() - started,
    )


def _write_day(
    world: AppStoreWorld, out: Path, day: int, rows_per_day: int, chunk_rows: int, shard_rows: int
) -> dict[str, Any]:
    """Write one day's folder, close the day in ``world`` and return the day's statistics."""
    rng = np.random.default_rng([world.settings.seed, _STREAM_LOGS, day])
    day_dir = out / f"day={day:03d}"
    day_dir.mkdir()
    writer = _ShardWriter(day_dir, shard_rows)
    positives = 0
    queries = 0
    won_users: list[np.ndarray] = []
    won_apps: list[np.ndarray] = []
    try:
        for chunk in world.iter_impressions(day, rows_per_day, rng, chunk_rows):
            writer.write(world.to_record_batch(chunk))
            won = chunk.label == 1
            positives += int(won.sum())
            # Queries never span chunks, so per-chunk counts add up.
            queries += len(np.unique(chunk.query))
            won_users.append(chunk.user[won])
            won_apps.append(chunk.app[won])
    finally:
        writer.close()
    world.end_day(day, np.concatenate(won_users), np.concatenate(won_apps))
    num_apps = world.num_apps_on(day)
    return {
        "day": day,
        "folder": day_dir.name,
        "rows": rows_per_day,
        "queries": queries,
        "label_rate": positives / rows_per_day,
        "num_apps": num_apps,
        "new_apps": num_apps - world.num_apps_on(day - 1) if day > 1 else 0,
        "files": [p.relative_to(out).as_posix() for p in writer.paths],
    }


class _ShardWriter:
    """Writes record batches into part-NNNNN.parquet files of at most ``shard_rows`` rows."""

    def __init__(self, folder: Path, shard_rows: int) -> None:
        self._folder = folder
        self._shard_rows = shard_rows
        self._writer: pq.ParquetWriter | None = None
        self._rows_in_shard = 0
        self.paths: list[Path] = []

    def write(self, batch: pa.RecordBatch) -> None:
        while batch.num_rows:
            if self._writer is None or self._rows_in_shard == self._shard_rows:
                self._open_next()
            piece = batch.slice(0, self._shard_rows - self._rows_in_shard)
            self._writer.write_batch(piece)
            self._rows_in_shard += piece.num_rows
            batch = batch.slice(piece.num_rows)

    def _open_next(self) -> None:
        self.close()
        path = self._folder / f"part-{len(self.paths):05d}.parquet"
        self._writer = pq.ParquetWriter(path, IMPRESSION_SCHEMA)
        self._rows_in_shard = 0
        self.paths.append(path)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


# ------------------------------------------------------------------------------ internals


def _require_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise UsageError(f"{name} must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise UsageError(f"{name} must be {bound}, got {value}")


def _require_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise UsageError(f"{name} must be in [0, 1], got {value}")


def _check_range(name: str, values: np.ndarray, upper: int) -> None:
    if len(values) and (values.min() < 0 or values.max() >= upper):
        raise UsageError(f"{name} holds values outside [0, {upper})")


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / x.sum()


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _draw(cdf: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` indices drawn in proportion to the (unnormalised) cumulative weights ``cdf``."""
    pos = np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right")
    return np.minimum(pos, len(cdf) - 1).astype(np.int64)


def _categorical_rows(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One category per row of a row-stochastic matrix."""
    cdf = np.cumsum(probs, axis=1)
    pick = (cdf < rng.random((len(probs), 1)) * cdf[:, -1:]).sum(axis=1)
    return np.minimum(pick, probs.shape[1] - 1).astype(np.int64)


def _member(keys: np.ndarray, owner: np.ndarray, app: np.ndarray) -> np.ndarray:
    """Whether each (owner, app) is in the sorted key array."""
    query = (owner.astype(np.int64) << _KEY_SHIFT) | app
    if len(keys) == 0:
        return np.zeros(len(query), bool)
    pos = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
    return keys[pos] == query


def ragged_gather(
    offsets: np.ndarray, values: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``rows`` of a CSR structure, as a new CSR (offsets, values)."""
    start = offsets[rows]
    length = offsets[rows + 1] - start
    out_offsets = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(length, out=out_offsets[1:])
    idx = np.repeat(start - out_offsets[:-1], length) + np.arange(out_offsets[-1])
    return out_offsets, values[idx]


def _parse_ids(column: pa.Array | pa.ChunkedArray, name: str) -> np.ndarray:
    """Integer index of ids like "u0001234" / "a000123" (the letter prefix is dropped)."""
    try:
        ints = pc.cast(pc.utf8_slice_codeunits(column, 1), pa.int64())
    except pa.ArrowInvalid as exc:
        raise UsageError(f"{name} holds ids that are not a letter followed by digits") from exc
    if ints.null_count:
        raise UsageError(f"{name} holds nulls")
    return np.asarray(ints.to_numpy(), np.int64)
