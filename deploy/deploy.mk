# Deployment on the 8xH200 node (docker compose) and its CPU-side checks.
# Included by the repository's Makefile, so paths are relative to the repository root and $(PY),
# `setup` and `proto` come from there. up/down/logs/ps/health need only docker and make on the node.

COMPOSE ?= docker compose
DEPLOY_ENV ?= deploy/.env
COMPOSE_RUN = $(COMPOSE) -p hyperdistill -f deploy/compose.yaml $(if $(wildcard $(DEPLOY_ENV)),--env-file $(DEPLOY_ENV))
# The teacher's health, as compose's health check asks it (grpcurl exits 0 for NOT_SERVING too): run
# by the container's shell, where GRPCURL_TLS_FLAGS (deploy/.env) holds the TLS flags when TLS is on.
TEACHER_HEALTH_CHECK = grpcurl $${GRPCURL_TLS_FLAGS:--plaintext} -max-time 5 -d '{"service": ""}' 127.0.0.1:50051 grpc.health.v1.Health/Check

.PHONY: up down logs ps health deploy-tools deploy-check

up: ## 8xH200 node: build the images, start teacher, trainer (once the teacher is healthy), Prometheus, Grafana
	@test -f $(DEPLOY_ENV) || { echo "$(DEPLOY_ENV) is missing: cp deploy/.env.example $(DEPLOY_ENV) and fill it in" >&2; exit 1; }
	$(COMPOSE_RUN) up -d --build

down: ## stop and remove the containers (model cache, data, checkpoints and metrics stay)
	$(COMPOSE_RUN) down

logs: ## follow the services' logs (SERVICE=trainer for one)
	$(COMPOSE_RUN) logs -f --tail 200 $(SERVICE)

ps: ## the services and their health
	$(COMPOSE_RUN) ps

health: ## grpc.health.v1.Health/Check against the teacher; fails unless it is SERVING
	@out=$$($(COMPOSE_RUN) exec -T teacher sh -c '$(subst ','\'',$(TEACHER_HEALTH_CHECK))') && echo "$$out" && echo "$$out" | grep -q '"SERVING"'

deploy-tools: ## install promtool and docker-compose (Debian packages) for deploy-check, if missing
	@command -v promtool >/dev/null && command -v docker-compose >/dev/null || { \
	  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus docker-compose; }

deploy-check: setup proto deploy-tools ## CPU-side checks of deploy/: layout, compose, Prometheus rules, dashboards, live metrics
	$(PY) -m hyperdistill.common.cluster check
	$(PY) -m pytest -q tests/test_deploy.py
