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

# A regular install, as from a wheel: the SQL migrations ship inside the package
# (bridge/migrations), so `agent-bridge migrate` needs no source tree. /app keeps the rest
# of the build context for what you add there (AGENTS_FILE, your own handler modules, which
# `celery -A tasks` imports from the working directory); the package's own sources and
# build leftovers are removed from it, so every process runs the installed copy.
# .dockerignore keeps tests, the .venv and .env out of the image.
COPY . .
RUN pip install ".[openai]" && rm -rf build ./*.egg-info bridge tasks

USER app

# The bridge. Compose overrides this for the worker, Flower and migrate.
CMD ["agent-bridge", "run"]
