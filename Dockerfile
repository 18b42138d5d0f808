# One image for every process of the fleet; the command picks the process.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway_state gateway_state
COPY picker picker
COPY collector collector
COPY controller controller
COPY simulator simulator
COPY local_fleet local_fleet
COPY examples examples
RUN pip install --no-cache-dir '.[runtime]'
CMD ["local-fleet", "--manifests", "/app/examples/fleet", "--work-dir", "/tmp/fleet"]
