# One image for every process of agent-bridge; docker-compose.yml picks the command:
#   bridge  agent-bridge run            (the default CMD)
#   worker  celery -A tasks worker
#   flower  celery -A tasks flower
#   migrate agent-bridge migrate
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The processes run as this user; the code under /app stays root-owned, so they can't
# rewrite it.
RUN useradd --create-home --uid 10001 --user-group app

WORKDIR /app

# Dependencies first, listed from pyproject.toml, so an edit to the code doesn't reinstall
# them. Only the `openai` extra: `local` (embedded Postgres/Redis) is for running without
# Docker, and compose brings real servers.
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['openai']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# Why an editable install: `agent-bridge migrate` reads its SQL from
# Path(bridge/migrate.py).parent.parent / "supabase" / "migrations", i.e. from the source
# tree next to the `bridge` package. A regular `pip install .` puts `bridge` into
# site-packages, where that path doesn't exist. `pip install -e .` leaves the package
# in /app/bridge, so migrations are found in /app/supabase/migrations, and `bridge` and
# `tasks` still import from any directory (`celery -A tasks`). .dockerignore keeps
# tests, the .venv and .env out of the image.
COPY . .
RUN pip install -e ".[openai]"

USER app

# The bridge. Compose overrides this for the worker, Flower and migrate.
CMD ["agent-bridge", "run"]
