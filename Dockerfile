# mailsvc: the gRPC mail service. Build: docker build -t mailsvc .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A non-editable install: pyproject.toml maps generated/mailsvc/v1 in as mailsvc.v1, so the
# sources are not needed at run time.
WORKDIR /src
COPY . .
RUN pip install --no-cache-dir -c constraints.txt . \
    && cd / && rm -rf /src

# A fixed non-root uid/gid, so bind mounts can be prepared on the host (chown 10001).
RUN groupadd --system --gid 10001 mailsvc \
    && useradd --system --uid 10001 --gid mailsvc --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin mailsvc \
    && mkdir -p /data \
    && chown mailsvc:mailsvc /data \
    && chmod 0700 /data
VOLUME ["/data"]
WORKDIR /data

ENV MAILSVC_LISTEN=0.0.0.0:50051 \
    MAILSVC_DATA_DIR=/data
EXPOSE 50051

HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD mailsvc health --server 127.0.0.1:50051

USER mailsvc
ENTRYPOINT ["mailsvc"]
CMD ["serve"]
