"""What every service process shares: settings, logging, health, NATS/Redis, heartbeats, and the
stage workers that wrap `livestage.runtime.stages` behind NATS subjects."""
