# Deployment on the 8xH200 node (docker compose) and its CPU-side checks.
# Included by the repository's Makefile, so paths are relative to the repository root and $(PY),
# `setup` and `proto` come from there. up/down/logs/ps/health need only docker and make on the node.

COMPOSE ?= docker compose
DEPLOY_ENV ?= deploy/.env
COMPOSE_RUN = $(COMPOSE) -p hyperdistill -f deploy/compose.yaml $(if $(wildcard $(DEPLOY_ENV)),--env-file $(DEPLOY_ENV))
# Every GPU service is in a compose profile (deploy/compose.yaml): live = teacher + trainer, precompute =
# teacher + precompute, cache = trainer-all. Commands that start nothing see all of them.
ALL_PROFILES = --profile live --profile precompute --profile cache
REQUIRE_ENV = @test -f $(DEPLOY_ENV) || { echo "$(DEPLOY_ENV) is missing: cp deploy/.env.example $(DEPLOY_ENV) and fill it in" >&2; exit 1; }
# The teacher-cache phase's services' ports (deploy/cluster.yaml, cache:).
PRECOMPUTE_METRICS_URL = http://127.0.0.1:9409/metrics
# The teacher's health, as compose's health check asks it (grpcurl exits 0 for NOT_SERVING too): run
# by the container's shell, where GRPCURL_TLS_FLAGS (deploy/.env) holds the TLS flags when TLS is on.
TEACHER_HEALTH_CHECK = grpcurl $${GRPCURL_TLS_FLAGS:--plaintext} -max-time 5 -d '{"service": ""}' 127.0.0.1:50051 grpc.health.v1.Health/Check

.PHONY: up precompute precompute-progress train-cached down logs ps health deploy-tools deploy-check

up: ## 8xH200 node: build the images, start teacher, trainer (once the teacher is healthy), Prometheus, Grafana
	$(REQUIRE_ENV)
	$(COMPOSE_RUN) --profile live up -d --build

precompute: ## fill the teacher top-K cache through the teacher (GPUs 0-3; starts it if needed), beside `make up`'s trainer
	$(REQUIRE_ENV)
	$(COMPOSE_RUN) --profile precompute up -d --build

precompute-progress: ## the running precompute's metrics: positions scored and remaining, ETA in seconds
	@$(COMPOSE_RUN) $(ALL_PROFILES) exec -T precompute python -c "import urllib.request as u; \
	  print(*(l for l in u.urlopen('$(PRECOMPUTE_METRICS_URL)').read().decode().splitlines() if l.startswith('precompute_')), sep='\n')"

train-cached: ## once precompute exited 0: stop teacher, trainer and precompute, train on GPUs 0-7 from the cache (trainer-all)
	$(REQUIRE_ENV)
	@if [ "$(SKIP_PRECOMPUTE_CHECK)" != 1 ]; then \
	  id=$$($(COMPOSE_RUN) $(ALL_PROFILES) ps -a -q precompute); \
	  state=$$(if [ -n "$$id" ]; then docker inspect -f '{{.State.Status}} {{.State.ExitCode}}' $$id; fi); \
	  [ "$$state" = "exited 0" ] || { echo "precompute has not completed (its container: $${state:-none}): run \
	make precompute until it exits 0 (a rerun scores only what is missing), or SKIP_PRECOMPUTE_CHECK=1" >&2; exit 1; }; \
	fi
	$(COMPOSE_RUN) $(ALL_PROFILES) stop precompute trainer teacher
	$(COMPOSE_RUN) --profile cache up -d --build

down: ## stop and remove the containers of every profile (model cache, teacher cache, data, checkpoints and metrics stay)
	$(COMPOSE_RUN) $(ALL_PROFILES) down

logs: ## follow the services' logs (SERVICE=trainer for one)
	$(COMPOSE_RUN) $(ALL_PROFILES) logs -f --tail 200 $(SERVICE)

ps: ## the services and their health
	$(COMPOSE_RUN) $(ALL_PROFILES) ps

health: ## grpc.health.v1.Health/Check against the teacher; fails unless it is SERVING
	@out=$$($(COMPOSE_RUN) $(ALL_PROFILES) exec -T teacher sh -c '$(subst ','\'',$(TEACHER_HEALTH_CHECK))') && echo "$$out" && echo "$$out" | grep -q '"SERVING"'

deploy-tools: ## install promtool and docker-compose (Debian packages) for deploy-check, if missing
	@command -v promtool >/dev/null && command -v docker-compose >/dev/null || { \
	  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus docker-compose; }

deploy-check: setup proto deploy-tools ## CPU-side checks of deploy/: layout, compose, Prometheus rules, dashboards, live metrics
	$(PY) -m tests.devtools.cluster check
	$(PY) -m pytest -q tests/test_deploy.py
