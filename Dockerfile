# The itloop server and worker image. Torch comes from the CUDA wheels of the pinned release.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN useradd --create-home --uid 1000 itloop
WORKDIR /app
COPY pyproject.toml README.md ./
COPY itloop ./itloop
RUN pip install torch==2.14.1 torchvision==0.29.1 && pip install '.[gpu]'
USER itloop
ENV ITLOOP_DATA_DIR=/data
VOLUME ["/data"]
EXPOSE 8000
ENTRYPOINT ["itloop"]
CMD ["serve", "--host", "0.0.0.0"]
