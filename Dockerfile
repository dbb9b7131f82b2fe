# A torchrelay worker daemon. Build: docker build -t torchrelay .
FROM python:3.11-slim
WORKDIR /app
# CPU-only torch first: the default index would pull a multi-GB CUDA build.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY torchrelay ./torchrelay
COPY broker ./broker
COPY worker ./worker
COPY client ./client
COPY configs ./configs
RUN pip install --no-cache-dir .
RUN useradd --create-home relay
USER relay
ENTRYPOINT ["torchrelay"]
CMD ["worker", "--help"]
