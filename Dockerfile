# whale's server with torch's CPU build (the front over an upstream needs no accelerator): the `front` service of
# the docker-compose.yml that `whale plan --emit` writes builds this. `docker build -t whale .`
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/whale
COPY pyproject.toml README.md ./
COPY requirements requirements
COPY whale whale
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
    && pip install --no-cache-dir -c requirements/lock.txt .
ENTRYPOINT ["whale"]
