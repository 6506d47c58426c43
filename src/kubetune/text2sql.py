"""The builtin Text-to-SQL data set: generated rows in the style of the public sql-create-context data set.

Each row is ``{"context", "question", "answer"}``: ``context`` is ``CREATE TABLE`` statement(s) naming only the
columns the query uses (two statements joined by ``"; "`` for a join), ``question`` is English, ``answer`` is
SQLite SQL with upper-case keywords, string literals in single quotes and numbers bare.

It exists so that the whole lifecycle runs with no download, and so that a small model can visibly learn
something in a short run: one phrasing family maps to one query shape, the literals in the question appear
verbatim in the SQL, and most answers are under ~40 tokens. A 270M model fine-tuned for ~100 steps on ~1500
rows should go from near 0 to most answers right. Every answer runs on its own context in SQLite (tested).

Rows are a pure function of ``(n, seed)``: one ``random.Random(seed)``, no global state.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

# Query shapes and how often each is drawn (weights are relative). Single filters dominate real data sets,
# so they get the most weight; joins and GROUP BY are longer and rarer.
SHAPES: dict[str, str] = {
    "select_where": "SELECT a column WHERE one column equals a value",
    "where_and": "two conditions joined by AND",
    "where_or": "two conditions joined by OR",
    "compare": "one comparison with <, >, <=, >= or !=",
    "count": "COUNT(*) with a filter",
    "aggregate": "SUM / AVG / MIN / MAX of a number, with or without a filter",
    "order_limit": "ORDER BY a number (DESC or ascending) with LIMIT",
    "group_count": "GROUP BY a column with COUNT(*), optionally the largest group",
    "distinct": "SELECT DISTINCT a column, with or without a filter",
    "join": "JOIN of two tables on a shared key, with a filter",
}
_SHAPE_WEIGHTS = {"select_where": 14, "where_and": 10, "where_or": 8, "compare": 12, "count": 10, "aggregate": 12,
                  "order_limit": 10, "group_count": 7, "distinct": 7, "join": 10}

# ---- vocabulary ------------------------------------------------------------------------------------------
_FIRST = ("Anna", "Ben", "Carla", "David", "Elena", "Felix", "Grace", "Hugo", "Irene", "Jonas", "Karen", "Liam",
          "Maria", "Nikos", "Olivia", "Pedro", "Quinn", "Rosa", "Samir", "Tara", "Umar", "Vera", "Walter", "Yuki",
          "Zoe", "Marco", "Lena", "Ravi", "Sofia", "Tomas")
_LAST = ("Smith", "Garcia", "Chen", "Muller", "Rossi", "Kowalski", "Novak", "Silva", "Kim", "Patel", "Dubois",
         "Jensen", "Okafor", "Tanaka", "Lopez", "Brown", "Ivanova", "Haddad", "Nguyen", "Larsen", "Moreau", "Costa")
_CITIES = ("Boston", "Chicago", "Denver", "Seattle", "Austin", "Toronto", "London", "Paris", "Berlin", "Madrid",
           "Lisbon", "Dublin", "Oslo", "Vienna", "Prague", "Tokyo", "Sydney", "Lagos", "Nairobi", "Lima")
_COUNTRIES = ("France", "Germany", "Spain", "Italy", "Brazil", "Canada", "Japan", "Kenya", "Peru", "Norway",
              "Poland", "India", "Mexico", "Egypt", "Chile")
_ADJ = ("Silent", "Golden", "Broken", "Hidden", "Last", "Crimson", "Distant", "Frozen", "Secret", "Wild", "Little",
        "Electric", "Midnight", "Burning", "Endless")
_NOUN = ("River", "Garden", "Empire", "Shadow", "Harbor", "Mirror", "Forest", "Signal", "Voyage", "Kingdom",
         "Letter", "Machine", "Island", "Storm", "Window")
_PRODUCTS = ("Desk Lamp", "Office Chair", "Water Bottle", "Backpack", "Headphones", "Coffee Maker", "Monitor",
             "Keyboard", "Running Shoes", "Tent", "Blender", "Notebook", "Phone Case", "Umbrella", "Toaster")
_TEAMS = ("Rovers", "United", "Athletic", "City", "Wanderers", "Rangers", "Albion", "Dynamo", "Olympic", "Sporting")


def _person(rng: random.Random) -> str:
    return f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"


def _title(rng: random.Random) -> str:
    return f"The {rng.choice(_ADJ)} {rng.choice(_NOUN)}" if rng.random() < 0.5 else \
        f"{rng.choice(_ADJ)} {rng.choice(_NOUN)}"


def _team(rng: random.Random) -> str:
    return f"{rng.choice(_CITIES)} {rng.choice(_TEAMS)}"


def _pool(*values: str) -> Callable[[random.Random], str]:
    return lambda rng: rng.choice(values)


# ---- schema ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    name: str
    type: str  # VARCHAR, INTEGER or REAL
    phrase: str  # how questions name the column
    text: Callable[[random.Random], str] | None = None  # VARCHAR values
    low: float = 0  # INTEGER / REAL range of values drawn for questions
    high: float = 100
    categorical: bool = False  # few distinct values: fit for GROUP BY and DISTINCT

    @property
    def numeric(self) -> bool:
        return self.type != "VARCHAR"

    def value(self, rng: random.Random) -> str | int | float:
        if self.type == "VARCHAR":
            return self.text(rng)
        if self.type == "INTEGER":
            return rng.randint(int(self.low), int(self.high))
        return round(rng.uniform(self.low, self.high), 1 if self.high <= 10 else 2)


def _v(name: str, phrase: str, text: Callable[[random.Random], str], categorical: bool = True) -> Column:
    return Column(name, "VARCHAR", phrase, text=text, categorical=categorical)


def _i(name: str, phrase: str, low: int, high: int) -> Column:
    return Column(name, "INTEGER", phrase, low=low, high=high)


def _r(name: str, phrase: str, low: float, high: float) -> Column:
    return Column(name, "REAL", phrase, low=low, high=high)


@dataclass(frozen=True)
class Table:
    name: str
    singular: str
    plural: str
    label: Column  # the column that names a row (name, title): what "which employee" asks for
    columns: tuple[Column, ...]  # the other columns (join keys are added by the relations below)
    keys: tuple[Column, ...] = field(default=())

    @property
    def all_columns(self) -> tuple[Column, ...]:
        return (self.label, *self.columns, *self.keys)

    def col(self, name: str) -> Column:
        return next(c for c in self.all_columns if c.name == name)


def _id(name: str, phrase: str) -> Column:
    return Column(name, "INTEGER", phrase, low=1, high=40)


_NAME = _v("name", "name", _person, categorical=False)
TABLES: tuple[Table, ...] = (
    Table("employees", "employee", "employees", _NAME, (
        _v("department", "department", _pool("Sales", "Marketing", "Engineering", "Finance", "Legal", "Support")),
        _v("city", "city", _pool(*_CITIES)),
        _i("salary", "salary", 30000, 150000), _i("age", "age", 21, 65), _i("hire_year", "hire year", 1995, 2023),
        _r("performance_score", "performance score", 1, 5)), keys=(_id("department_id", "department id"),)),
    Table("departments", "department", "departments",
          _v("name", "name", _pool("Sales", "Marketing", "Engineering", "Finance", "Legal", "Support", "Research"),
             categorical=False), (
              _v("city", "city", _pool(*_CITIES)), _r("budget", "budget", 10000, 900000),
              _i("headcount", "headcount", 3, 400), _i("founded", "founding year", 1950, 2020)),
          keys=(_id("department_id", "department id"),)),
    Table("products", "product", "products", _v("name", "name", _pool(*_PRODUCTS), categorical=False), (
        _v("category", "category", _pool("Electronics", "Furniture", "Kitchen", "Outdoor", "Office", "Sports")),
        _v("brand", "brand", _pool("Acme", "Nordia", "Zenith", "Orion", "Kestrel", "Vantage")),
        _r("price", "price", 2, 2000), _i("stock", "stock", 0, 500), _r("rating", "rating", 1, 5),
        _r("weight_kg", "weight in kg", 0.1, 30))),
    Table("customers", "customer", "customers", _NAME, (
        _v("city", "city", _pool(*_CITIES)), _v("country", "country", _pool(*_COUNTRIES)),
        _i("age", "age", 18, 90), _i("loyalty_points", "loyalty points", 0, 5000)),
          keys=(_id("customer_id", "customer id"),)),
    Table("orders", "order", "orders", _i("order_id", "order id", 1000, 9999), (
        _v("product", "product", _pool(*_PRODUCTS)),
        _v("status", "status", _pool("pending", "shipped", "delivered", "cancelled", "returned")),
        _i("quantity", "quantity", 1, 50), _r("total", "total amount", 5, 5000), _i("order_year", "order year",
                                                                                      2015, 2024)),
          keys=(_id("customer_id", "customer id"),)),
    Table("students", "student", "students", _NAME, (
        _v("major", "major", _pool("Biology", "History", "Physics", "Economics", "Music", "Chemistry", "Law")),
        _v("hometown", "hometown", _pool(*_CITIES)), _i("age", "age", 17, 30), _i("year", "year", 1, 4),
        _r("gpa", "GPA", 1, 4), _i("credits", "credits", 0, 240))),
    Table("films", "film", "films", _v("title", "title", _title, categorical=False), (
        _v("director", "director", _person, categorical=False),
        _v("genre", "genre", _pool("Drama", "Comedy", "Horror", "Action", "Documentary", "Animation", "Thriller")),
        _i("release_year", "release year", 1970, 2024), _i("duration_minutes", "running time in minutes", 70, 200),
        _r("box_office", "box office in millions", 0.5, 900), _r("rating", "rating", 1, 10))),
    Table("matches", "match", "matches", _v("home_team", "home team", _team, categorical=False), (
        _v("away_team", "away team", _team, categorical=False),
        _v("stadium", "stadium", _pool("Riverside Park", "Victoria Ground", "North Stadium", "Central Arena",
                                       "Hillside Field", "Harbour Stadium")),
        _v("referee", "referee", _person, categorical=False), _i("home_goals", "home goals", 0, 7),
        _i("away_goals", "away goals", 0, 7), _i("attendance", "attendance", 1000, 90000),
        _i("season", "season", 2000, 2024))),
    Table("flights", "flight", "flights", _v("flight_number", "flight number",
                                             lambda rng: f"{rng.choice(('BA', 'LH', 'AF', 'KL', 'UA', 'IB'))}"
                                                         f"{rng.randint(100, 999)}", categorical=False), (
        _v("origin", "origin", _pool(*_CITIES)), _v("destination", "destination", _pool(*_CITIES)),
        _i("distance_km", "distance in km", 200, 15000), _i("duration_minutes", "duration in minutes", 40, 960),
        _r("price", "price", 40, 3000), _i("passengers", "number of passengers", 20, 500)),
          keys=(_id("airline_id", "airline id"),)),
    Table("airlines", "airline", "airlines", _v("name", "name", _pool(
        "Skyways", "Blue Jet", "Northern Air", "Sunline", "Polar Wings", "Coastal Airways", "Aero Azul"),
        categorical=False), (
        _v("country", "country", _pool(*_COUNTRIES)), _i("founded", "founding year", 1920, 2020),
        _i("fleet_size", "fleet size", 5, 900), _r("on_time_rate", "on-time rate", 50, 99)),
          keys=(_id("airline_id", "airline id"),)),
    Table("books", "book", "books", _v("title", "title", _title, categorical=False), (
        _v("genre", "genre", _pool("Fantasy", "Mystery", "Romance", "Poetry", "Biography", "Science")),
        _v("publisher", "publisher", _pool("Penguin", "Harper", "Vintage", "Orbit", "Faber", "Tor")),
        _i("pages", "number of pages", 60, 1200), _i("published_year", "publication year", 1900, 2024),
        _r("price", "price", 3, 80)), keys=(_id("author_id", "author id"),)),
    Table("authors", "author", "authors", _NAME, (
        _v("nationality", "nationality", _pool("British", "French", "Nigerian", "Japanese", "Chilean", "Polish",
                                                "Canadian")),
        _i("birth_year", "birth year", 1900, 1995), _i("awards", "number of awards", 0, 30)),
          keys=(_id("author_id", "author id"),)),
    Table("hospitals", "hospital", "hospitals", _v("name", "name", lambda rng: f"{rng.choice(_CITIES)} "
                                                   f"{rng.choice(('General', 'Memorial', 'Central', 'Royal'))} "
                                                   "Hospital", categorical=False), (
        _v("city", "city", _pool(*_CITIES)), _i("beds", "number of beds", 20, 2000),
        _i("founded", "founding year", 1850, 2020), _r("rating", "rating", 1, 5)),
          keys=(_id("hospital_id", "hospital id"),)),
    Table("patients", "patient", "patients", _NAME, (
        _v("diagnosis", "diagnosis", _pool("Asthma", "Diabetes", "Fracture", "Influenza", "Migraine",
                                            "Pneumonia")),
        _i("age", "age", 0, 99), _i("days_admitted", "days admitted", 1, 60), _r("bill", "bill", 100, 90000),
        _v("blood_type", "blood type", _pool("A", "B", "AB", "O"))), keys=(_id("hospital_id", "hospital id"),)),
    Table("players", "player", "players", _NAME, (
        _v("position", "position", _pool("Goalkeeper", "Defender", "Midfielder", "Forward")),
        _v("nationality", "nationality", _pool("Brazilian", "Spanish", "French", "Ghanaian", "Korean", "Dutch")),
        _i("goals", "goals", 0, 40), _i("age", "age", 16, 40), _i("appearances", "appearances", 0, 60),
        _r("salary", "salary", 0.1, 30)), keys=(_id("team_id", "team id"),)),
    Table("teams", "team", "teams", _v("name", "name", _team, categorical=False), (
        _v("city", "city", _pool(*_CITIES)), _v("coach", "coach", _person, categorical=False),
        _i("founded", "founding year", 1870, 2010), _i("titles", "number of titles", 0, 40)),
          keys=(_id("team_id", "team id"),)),
    Table("countries", "country", "countries", _v("name", "name", _pool(*_COUNTRIES), categorical=False), (
        _v("continent", "continent", _pool("Europe", "Asia", "Africa", "South America", "North America")),
        _v("capital", "capital", _pool(*_CITIES), categorical=False), _i("population", "population", 100000,
                                                                         300000000),
        _i("area_km2", "area in square km", 300, 9000000), _r("gdp_billions", "GDP in billions", 1, 5000))),
    Table("songs", "song", "songs", _v("title", "title", _title, categorical=False), (
        _v("artist", "artist", _person, categorical=False),
        _v("genre", "genre", _pool("Pop", "Rock", "Jazz", "Hip Hop", "Folk", "Electronic")),
        _i("release_year", "release year", 1960, 2024), _i("duration_seconds", "length in seconds", 90, 600),
        _i("plays", "number of plays", 0, 5000000))),
    Table("cars", "car", "cars", _v("model", "model", _pool("Falcon", "Aurora", "Comet", "Ranger", "Vista",
                                                            "Spark", "Atlas"), categorical=False), (
        _v("make", "make", _pool("Toyota", "Ford", "Volvo", "Fiat", "Kia", "Skoda")),
        _v("fuel_type", "fuel type", _pool("petrol", "diesel", "electric", "hybrid")),
        _v("color", "color", _pool("red", "black", "white", "blue", "silver")), _i("year", "year", 2000, 2024),
        _r("price", "price", 3000, 90000), _i("horsepower", "horsepower", 60, 600))),
)
_BY_NAME = {t.name: t for t in TABLES}


@dataclass(frozen=True)
class Relation:
    """child.key = parent.key; ``verb`` reads "<children> <verb> <a parent>" (plural, singular)."""

    child: str
    parent: str
    key: str
    verb: tuple[str, str]


RELATIONS: tuple[Relation, ...] = (
    Relation("employees", "departments", "department_id", ("who work in", "who works in")),
    Relation("orders", "customers", "customer_id", ("placed by", "placed by")),
    Relation("books", "authors", "author_id", ("written by", "written by")),
    Relation("patients", "hospitals", "hospital_id", ("treated at", "treated at")),
    Relation("flights", "airlines", "airline_id", ("operated by", "operated by")),
    Relation("players", "teams", "team_id", ("who play for", "who plays for")),
)

# ---- English ---------------------------------------------------------------------------------------------
_OPS = {
    ">": ("greater than", "more than", "above"),
    "<": ("less than", "below", "under"),
    ">=": ("at least", "greater than or equal to"),
    "<=": ("at most", "less than or equal to"),
    "!=": ("not", "not equal to", "different from"),
}


def _a(word: str) -> str:
    return f"an {word}" if word[0].lower() in "aeiou" else f"a {word}"


def _plural(word: str) -> str:
    if word.endswith("y") and word[-2:-1] not in tuple("aeiou"):
        return word[:-1] + "ies"
    if word.endswith(("s", "x", "ch", "sh")):
        return word + "es"
    return word + "s"


def _sql_value(value: str | int | float) -> str:
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return str(value)


@dataclass
class _Cond:
    column: Column
    op: str
    value: str | int | float
    prefix: str = ""  # "T1." / "T2." in joins

    def sql(self) -> str:
        return f"{self.prefix}{self.column.name} {self.op} {_sql_value(self.value)}"

    def relation(self, rng: random.Random) -> str:
        """"42" or "greater than 42": what follows "<column> is"."""
        return str(self.value) if self.op == "=" else f"{rng.choice(_OPS[self.op])} {self.value}"

    def english(self, rng: random.Random) -> str:
        return f"{self.column.phrase} is {self.relation(rng)}"


def _cond(rng: random.Random, column: Column, ops: tuple[str, ...] = ("=",)) -> _Cond:
    op = rng.choice(ops if column.numeric else tuple(o for o in ops if o in ("=", "!=")) or ("=",))
    return _Cond(column, op, column.value(rng))


def _context(*tables: tuple[str, list[Column]]) -> str:
    parts = []
    for name, cols in tables:
        unique = list(dict.fromkeys(cols))
        parts.append(f"CREATE TABLE {name} ({', '.join(f'{c.name} {c.type}' for c in unique)})")
    return "; ".join(parts)


def _others(table: Table, *exclude: Column) -> list[Column]:
    return [c for c in (table.label, *table.columns) if c not in exclude]


def _eq_column(rng: random.Random, columns: list[Column]) -> Column:
    """A column to test for equality: mostly text (``price = 13.11`` is a question people rarely ask)."""
    text = [c for c in columns if not c.numeric]
    return rng.choice(text if text and rng.random() < 0.8 else columns)


# ---- shapes: each returns (question, answer, context) -----------------------------------------------------
def _select_where(rng: random.Random, t: Table) -> tuple[str, str, str]:
    if rng.random() < 0.3:  # "Which films have genre Drama?" asks for the label column
        where = _cond(rng, rng.choice(t.columns))
        sel = t.label
        q = rng.choice((f"Which {t.plural} have {where.column.phrase} {where.value}?",
                        f"List the {_plural(sel.phrase)} of {t.plural} whose {where.english(rng)}."))
    else:
        wcol = _eq_column(rng, list(t.columns))
        sel = rng.choice(_others(t, wcol))
        where = _cond(rng, wcol)
        q = rng.choice((f"What is the {sel.phrase} of the {t.singular} whose {where.english(rng)}?",
                        f"Which {sel.phrase} does the {t.singular} with {wcol.phrase} {where.value} have?",
                        f"Give the {sel.phrase} of {t.plural} where {where.english(rng)}.",
                        f"Find the {sel.phrase} for the {t.singular} whose {where.english(rng)}."))
    return q, f"SELECT {sel.name} FROM {t.name} WHERE {where.sql()}", _context((t.name, [sel, where.column]))


def _where_and(rng: random.Random, t: Table) -> tuple[str, str, str]:
    c1 = _eq_column(rng, _others(t))
    sel, c2 = rng.sample(_others(t, c1), 2)
    a, b = _cond(rng, c1, ("=",)), _cond(rng, c2, ("=", ">", "<", ">=", "<="))
    q = rng.choice((f"What is the {sel.phrase} of the {t.singular} whose {a.english(rng)} and whose "
                    f"{b.english(rng)}?",
                    f"List the {sel.phrase} of {t.plural} where {a.english(rng)} and {b.english(rng)}.",
                    f"Show the {sel.phrase} for {t.plural} whose {a.english(rng)} and {b.english(rng)}."))
    return q, f"SELECT {sel.name} FROM {t.name} WHERE {a.sql()} AND {b.sql()}", \
        _context((t.name, [sel, c1, c2]))


def _where_or(rng: random.Random, t: Table) -> tuple[str, str, str]:
    if rng.random() < 0.5:  # one column, two values: "either X or Y"
        c = _eq_column(rng, list(t.columns))
        sel = rng.choice(_others(t, c))
        v1 = c.value(rng)
        v2 = next((v for v in (c.value(rng) for _ in range(20)) if v != v1), f"{v1}x" if isinstance(v1, str)
                  else v1 + 1)
        a, b = _Cond(c, "=", v1), _Cond(c, "=", v2)
        q = rng.choice((f"What is the {sel.phrase} of {t.plural} whose {c.phrase} is either {v1} or {v2}?",
                        f"List the {sel.phrase} of {t.plural} with {c.phrase} {v1} or {v2}.",
                        f"Show the {sel.phrase} of every {t.singular} whose {c.phrase} is {v1} or {v2}."))
        cols = [sel, c]
    else:
        c1 = _eq_column(rng, _others(t))
        sel, c2 = rng.sample(_others(t, c1), 2)
        a, b = _cond(rng, c1, ("=",)), _cond(rng, c2, ("=", ">", "<"))
        q = rng.choice((f"List the {sel.phrase} of {t.plural} whose {a.english(rng)} or whose {b.english(rng)}.",
                        f"Which {sel.phrase} belongs to {t.plural} where {a.english(rng)} or {b.english(rng)}?",
                        f"Show the {sel.phrase} for {t.plural} whose {a.english(rng)} or {b.english(rng)}."))
        cols = [sel, c1, c2]
    return q, f"SELECT {sel.name} FROM {t.name} WHERE {a.sql()} OR {b.sql()}", _context((t.name, cols))


def _compare(rng: random.Random, t: Table) -> tuple[str, str, str]:
    numeric = [c for c in t.columns if c.numeric]
    col = rng.choice(numeric) if numeric and rng.random() < 0.85 else rng.choice(t.columns)
    cond = _cond(rng, col, (">", "<", ">=", "<=", "!="))
    if rng.random() < 0.4:
        sel = t.label
        q = rng.choice((f"Which {t.plural} have {_a(col.phrase)} {cond.relation(rng)}?" if cond.op != "!=" else
                        f"Which {t.plural} have a {col.phrase} that is {cond.relation(rng)}?",
                        f"List the {_plural(sel.phrase)} of {t.plural} whose {cond.english(rng)}."))
    else:
        sel = rng.choice(_others(t, col))
        q = rng.choice((f"List the {sel.phrase} of {t.plural} whose {cond.english(rng)}.",
                        f"What is the {sel.phrase} of {t.plural} where {cond.english(rng)}?",
                        f"Show the {sel.phrase} of every {t.singular} whose {cond.english(rng)}."))
    return q, f"SELECT {sel.name} FROM {t.name} WHERE {cond.sql()}", _context((t.name, [sel, col]))


def _count(rng: random.Random, t: Table) -> tuple[str, str, str]:
    col = rng.choice(t.columns)
    cond = _cond(rng, col, ("=", "=", ">", "<"))
    q = rng.choice((f"How many {t.plural} have {col.phrase} {cond.value}?" if cond.op == "=" else
                    f"How many {t.plural} have {_a(col.phrase)} {cond.relation(rng)}?",
                    f"Count the {t.plural} whose {cond.english(rng)}.",
                    f"What is the number of {t.plural} where {cond.english(rng)}?"))
    return q, f"SELECT COUNT(*) FROM {t.name} WHERE {cond.sql()}", _context((t.name, [col]))


_AGGS = {"SUM": ("total",), "AVG": ("average", "mean"), "MIN": ("minimum", "lowest", "smallest"),
         "MAX": ("maximum", "highest", "largest")}


def _aggregate(rng: random.Random, t: Table) -> tuple[str, str, str]:
    num = rng.choice([c for c in t.columns if c.numeric])
    fn = rng.choice(tuple(_AGGS))
    word = rng.choice(_AGGS[fn])
    if rng.random() < 0.25:
        q = rng.choice((f"What is the {word} {num.phrase} of all {t.plural}?",
                        f"Find the {word} {num.phrase} across {t.plural}."))
        return q, f"SELECT {fn}({num.name}) FROM {t.name}", _context((t.name, [num]))
    cond = _cond(rng, _eq_column(rng, _others(t, num)), ("=",))
    q = rng.choice((f"What is the {word} {num.phrase} of {t.plural} whose {cond.english(rng)}?",
                    f"Find the {word} {num.phrase} for {t.plural} where {cond.english(rng)}.",
                    f"Among {t.plural} with {cond.column.phrase} {cond.value}, what is the {word} {num.phrase}?"))
    return q, f"SELECT {fn}({num.name}) FROM {t.name} WHERE {cond.sql()}", _context((t.name, [num, cond.column]))


def _order_limit(rng: random.Random, t: Table) -> tuple[str, str, str]:
    num = rng.choice([c for c in t.columns if c.numeric])
    desc = rng.random() < 0.6
    word = rng.choice(("highest", "largest") if desc else ("lowest", "smallest"))
    order = f"ORDER BY {num.name} DESC" if desc else f"ORDER BY {num.name}"
    if rng.random() < 0.55:
        k, sel = 1, t.label
        q = rng.choice((f"Which {t.singular} has the {word} {num.phrase}?",
                        f"What is the {sel.phrase} of the {t.singular} with the {word} {num.phrase}?"))
    else:
        k = rng.randint(2, 5)
        sel = rng.choice(_others(t, num))
        q = rng.choice((f"List the {sel.phrase} of the {k} {t.plural} with the {word} {num.phrase}.",
                        f"Show the {sel.phrase} of the top {k} {t.plural} by {word} {num.phrase}."))
    return q, f"SELECT {sel.name} FROM {t.name} {order} LIMIT {k}", _context((t.name, [sel, num]))


def _group_count(rng: random.Random, t: Table) -> tuple[str, str, str]:
    col = rng.choice([c for c in t.columns if c.categorical])
    if rng.random() < 0.3:
        q = rng.choice((f"Which {col.phrase} has the most {t.plural}?",
                        f"What is the most common {col.phrase} among {t.plural}?"))
        return q, f"SELECT {col.name} FROM {t.name} GROUP BY {col.name} ORDER BY COUNT(*) DESC LIMIT 1", \
            _context((t.name, [col]))
    q = rng.choice((f"How many {t.plural} are there for each {col.phrase}?",
                    f"Count the {t.plural} in each {col.phrase}.",
                    f"For each {col.phrase}, how many {t.plural} are there?",
                    f"Show each {col.phrase} and the number of {t.plural}."))
    return q, f"SELECT {col.name}, COUNT(*) FROM {t.name} GROUP BY {col.name}", _context((t.name, [col]))


def _distinct(rng: random.Random, t: Table) -> tuple[str, str, str]:
    col = rng.choice([c for c in t.columns if c.categorical])
    words = _plural(col.phrase)
    if rng.random() < 0.4:
        q = rng.choice((f"List the distinct {words} of {t.plural}.", f"What are the different {words} of {t.plural}?",
                        f"Show all unique {words} among {t.plural}."))
        return q, f"SELECT DISTINCT {col.name} FROM {t.name}", _context((t.name, [col]))
    cond = _cond(rng, rng.choice(_others(t, col)), ("=", ">", "<"))
    q = rng.choice((f"What are the different {words} of {t.plural} whose {cond.english(rng)}?",
                    f"List the distinct {words} of {t.plural} where {cond.english(rng)}."))
    return q, f"SELECT DISTINCT {col.name} FROM {t.name} WHERE {cond.sql()}", _context((t.name, [col, cond.column]))


def _join(rng: random.Random, t: Table) -> tuple[str, str, str]:
    rel = next(r for r in RELATIONS if t.name in (r.child, r.parent))
    child, parent = _BY_NAME[rel.child], _BY_NAME[rel.parent]
    key_c, key_p = child.col(rel.key), parent.col(rel.key)
    on = f"FROM {child.name} AS T1 JOIN {parent.name} AS T2 ON T1.{rel.key} = T2.{rel.key}"
    if rng.random() < 0.6:  # children filtered by a fact about their parent
        sel = child.label if rng.random() < 0.6 else rng.choice(child.columns)
        cond = _cond(rng, rng.choice(_others(parent)), ("=", "=", ">", "<"))
        cond.prefix = "T2."
        q = rng.choice((
            f"What are the {_plural(sel.phrase)} of {child.plural} {rel.verb[0]} {_a(parent.singular)} whose "
            f"{cond.english(rng)}?",
            f"List the {sel.phrase} of {child.plural} {rel.verb[0]} {_a(parent.singular)} where {cond.english(rng)}.",
            f"Show the {sel.phrase} of every {child.singular} {rel.verb[1]} {_a(parent.singular)} whose "
            f"{cond.english(rng)}."))
        context = _context((child.name, [sel, key_c]), (parent.name, [key_p, cond.column]))
        return q, f"SELECT T1.{sel.name} {on} WHERE {cond.sql()}", context
    sel = rng.choice(_others(parent))
    cond = _cond(rng, _eq_column(rng, _others(child)), ("=",))
    cond.prefix = "T1."
    q = rng.choice((f"What is the {sel.phrase} of the {parent.singular} of the {child.singular} whose "
                    f"{cond.english(rng)}?",
                    f"For the {child.singular} whose {cond.english(rng)}, what is the {sel.phrase} of its "
                    f"{parent.singular}?",
                    f"Find the {parent.singular} {sel.phrase} for {child.plural} where {cond.english(rng)}."))
    context = _context((child.name, [key_c, cond.column]), (parent.name, [sel, key_p]))
    return q, f"SELECT T2.{sel.name} {on} WHERE {cond.sql()}", context


_BUILDERS: dict[str, Callable[[random.Random, Table], tuple[str, str, str]]] = {
    "select_where": _select_where, "where_and": _where_and, "where_or": _where_or, "compare": _compare,
    "count": _count, "aggregate": _aggregate, "order_limit": _order_limit, "group_count": _group_count,
    "distinct": _distinct, "join": _join,
}
_JOIN_TABLES = tuple(t for t in TABLES if any(t.name in (r.child, r.parent) for r in RELATIONS))


def generate_with_shapes(n: int, seed: int) -> list[tuple[str, dict[str, str]]]:
    """``n`` rows as (shape, row) pairs; the same ``(n, seed)`` always gives the same rows."""
    if n < 0:
        raise ValueError("n must be >= 0")
    rng = random.Random(seed)
    names, weights = list(_SHAPE_WEIGHTS), list(_SHAPE_WEIGHTS.values())
    rows: list[tuple[str, dict[str, str]]] = []
    seen: set[str] = set()
    while len(rows) < n:
        # A repeated question would leak between the train and eval splits; a few redraws avoid it, and the
        # bound keeps a very large n (more rows than distinct questions) from looping forever.
        for _ in range(20):
            shape = rng.choices(names, weights)[0]
            table = rng.choice(_JOIN_TABLES if shape == "join" else TABLES)
            question, answer, context = _BUILDERS[shape](rng, table)
            if question not in seen:
                break
        seen.add(question)
        rows.append((shape, {"context": context, "question": question, "answer": answer}))
    return rows


def generate(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` rows of ``{"context", "question", "answer"}`` (see the module docstring)."""
    return [row for _, row in generate_with_shapes(n, seed)]
