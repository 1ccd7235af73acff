// SPDX-License-Identifier: Apache-2.0
/*
 * ferryd, the ferry agent: main only parses and wires. It layers the configuration
 * (defaults, ferryd.yaml, command-line flags), creates the agent (VMs, migrations, the
 * migration listener) and the control API, tells systemd it is ready, then sleeps in
 * sigwait() until SIGTERM or SIGINT. Shutdown runs in a fixed order: the agent first (it
 * refuses new work, settles migrations and stops the VMs, and closes the event feed so API
 * streams end), then the API (so clients can watch the shutdown until the end), then the
 * memory. Signals are blocked in every thread and taken synchronously here, so no handler
 * and no global flag is needed.
 */
#include <errno.h>
#include <getopt.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

#include "agent/agent.h"
#include "agent/api.h"
#include "agent/config.h"

#define DEFAULT_CONFIG "/etc/ferry/ferryd.yaml"
#define OVERRIDES_MAX 16

static void usage(FILE *f)
{
	fprintf(
	    f, "Usage: ferryd [OPTIONS]\n"
	       "The ferry agent: runs VMs and live-migrates them to and from other agents.\n"
	       "\n"
	       "  -c, --config FILE        configuration file (default " DEFAULT_CONFIG
	       ", if present)\n"
	       "  -s, --socket PATH        control API unix socket (control.socket)\n"
	       "  -l, --listen HOST:PORT   migration listener (migration.listen)\n"
	       "  -n, --name NAME          agent name (name)\n"
	       "      --log-level LEVEL    error, warn, info or debug (log_level)\n"
	       "      --check-config FILE  check FILE as ferryd would at start-up; exit 0 if good\n"
	       "  -h, --help               this text\n"
	       "\n"
	       "Flags override the file. The API is described in docs/api.md, the file in\n"
	       "docs/config.md. SIGTERM or SIGINT stops the agent cleanly.\n");
}

struct override {
	const char *key;
	const char *value;
};

int main(int argc, char **argv)
{
	static const struct option opts[] = {
	    {"config", required_argument, NULL, 'c'},
	    {"socket", required_argument, NULL, 's'},
	    {"listen", required_argument, NULL, 'l'},
	    {"name", required_argument, NULL, 'n'},
	    {"log-level", required_argument, NULL, 'L'},
	    {"check-config", required_argument, NULL, 'C'},
	    {"help", no_argument, NULL, 'h'},
	    {NULL, 0, NULL, 0},
	};
	struct override ov[OVERRIDES_MAX];
	unsigned nov = 0;
	const char *config = NULL, *check = NULL;
	char err[512];
	int c;

	while ((c = getopt_long(argc, argv, "c:s:l:n:h", opts, NULL)) != -1) {
		const char *key = NULL;
		switch (c) {
		case 'c':
			config = optarg;
			break;
		case 'C':
			check = optarg;
			break;
		case 's':
			key = "control.socket";
			break;
		case 'l':
			key = "migration.listen";
			break;
		case 'n':
			key = "name";
			break;
		case 'L':
			key = "log_level";
			break;
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return 2;
		}
		if (key) {
			if (nov == OVERRIDES_MAX) {
				fprintf(stderr, "ferryd: too many options\n");
				return 2;
			}
			ov[nov++] = (struct override){key, optarg};
		}
	}
	if (optind < argc) {
		fprintf(stderr, "ferryd: unexpected argument '%s'\n", argv[optind]);
		usage(stderr);
		return 2;
	}

	if (check) {
		if (ferry_config_check(check, err, sizeof(err)) < 0) {
			fprintf(stderr, "%s\n", err);
			return 1;
		}
		printf("%s: OK\n", check);
		return 0;
	}

	struct ferry_config cfg;
	ferry_config_defaults(&cfg);
	/* The default file is optional (defaults alone make a working agent); a file named
	 * on the command line is not. */
	if (!config && access(DEFAULT_CONFIG, F_OK) == 0)
		config = DEFAULT_CONFIG;
	if (config && ferry_config_load(config, &cfg, err, sizeof(err)) < 0) {
		fprintf(stderr, "ferryd: %s\n", err);
		return 1;
	}
	for (unsigned i = 0; i < nov; i++) {
		if (ferry_config_set(&cfg, ov[i].key, ov[i].value, err, sizeof(err)) < 0) {
			fprintf(stderr, "ferryd: %s\n", err);
			return 2;
		}
	}
	if (ferry_config_validate(&cfg, err, sizeof(err)) < 0 ||
	    ferry_config_check_files(&cfg, err, sizeof(err)) < 0) {
		fprintf(stderr, "ferryd: %s%s%s\n", config ? config : "", config ? ": " : "", err);
		return 1;
	}

	/* Block the stop signals before any thread exists so every thread inherits the mask
	 * and only sigwait() below receives them. A client that hangs up must not kill us. */
	sigset_t stop;
	sigemptyset(&stop);
	sigaddset(&stop, SIGTERM);
	sigaddset(&stop, SIGINT);
	sigaddset(&stop, SIGHUP);
	pthread_sigmask(SIG_BLOCK, &stop, NULL);
	signal(SIGPIPE, SIG_IGN);

	struct agent *a = NULL;
	struct agent_error aerr = {0};
	if (agent_new(&cfg, &a, &aerr) < 0) {
		fprintf(stderr, "ferryd: %s\n", aerr.message);
		sd_notifyf(0, "STATUS=failed: %s", aerr.message);
		return 1;
	}
	struct api *api = NULL;
	if (api_new(a, &api, err, sizeof(err)) < 0) {
		fprintf(stderr, "ferryd: %s\n", err);
		sd_notifyf(0, "STATUS=failed: %s", err);
		agent_free(a);
		return 1;
	}

	const char *tcp = api_tcp_address(api);
	fprintf(stderr, "ferryd: ready: name=%s api=%s%s%s%s migration=%s\n", agent_name(a),
		cfg.control.socket[0] ? "unix:" : "", cfg.control.socket,
		tcp[0] ? (cfg.control.socket[0] ? ",tls:" : "tls:") : "", tcp,
		agent_listen_address(a));
	fflush(stderr);
	sd_notifyf(0, "READY=1\nSTATUS=serving the API on %s%s%s; migrations on %s",
		   cfg.control.socket[0] ? cfg.control.socket : "", tcp[0] ? " and " : "", tcp,
		   agent_listen_address(a));

	for (;;) {
		int sig = 0;
		if (sigwait(&stop, &sig) != 0)
			continue;
		if (sig == SIGHUP) {
			fprintf(stderr,
				"ferryd: SIGHUP ignored: the configuration is read at start; "
				"restart ferryd to apply changes\n");
			continue;
		}
		fprintf(stderr, "ferryd: %s: shutting down\n", strsignal(sig));
		break;
	}
	sd_notify(0, "STOPPING=1\nSTATUS=shutting down");
	agent_shutdown(a);
	api_stop(api);
	agent_free(a);
	api_free(api);
	fprintf(stderr, "ferryd: stopped\n");
	return 0;
}
