// SPDX-License-Identifier: Apache-2.0
/*
 * Per-host admission: how many migrations run at once in each direction, and the order in
 * which the waiting ones start (higher priority first, first come first served within a
 * priority). A host has tens of migrations at most, so a flat array scanned linearly is
 * the whole data structure. The caller locks.
 */
#include "scheduler/scheduler.h"

#include <errno.h>
#include <stdlib.h>

struct entry {
	uint64_t id;
	uint64_t seq; /* arrival order */
	int priority;
	enum sched_dir dir;
	bool running;
};

struct sched_admission {
	unsigned max[2];
	struct entry *e;
	unsigned n, cap;
	uint64_t seq;
};

int sched_admission_new(unsigned max_out, unsigned max_in, struct sched_admission **ret)
{
	struct sched_admission *a = calloc(1, sizeof(*a));
	if (!a)
		return -ENOMEM;
	a->max[SCHED_DIR_OUT] = max_out;
	a->max[SCHED_DIR_IN] = max_in;
	*ret = a;
	return 0;
}

void sched_admission_free(struct sched_admission *a)
{
	if (!a)
		return;
	free(a->e);
	free(a);
}

void sched_admission_set_limits(struct sched_admission *a, unsigned max_out, unsigned max_in)
{
	a->max[SCHED_DIR_OUT] = max_out;
	a->max[SCHED_DIR_IN] = max_in;
}

static int find(const struct sched_admission *a, uint64_t id)
{
	for (unsigned i = 0; i < a->n; i++)
		if (a->e[i].id == id)
			return (int)i;
	return -1;
}

unsigned sched_admission_running(const struct sched_admission *a, enum sched_dir dir)
{
	unsigned c = 0;
	for (unsigned i = 0; i < a->n; i++)
		c += a->e[i].dir == dir && a->e[i].running;
	return c;
}

unsigned sched_admission_waiting(const struct sched_admission *a, enum sched_dir dir)
{
	unsigned c = 0;
	for (unsigned i = 0; i < a->n; i++)
		c += a->e[i].dir == dir && !a->e[i].running;
	return c;
}

/* Does waiting entry x start before waiting entry y? */
static bool ahead(const struct entry *x, const struct entry *y)
{
	return x->priority > y->priority || (x->priority == y->priority && x->seq < y->seq);
}

/* The waiting entry of dir that starts next, or -1. */
static int head_of(const struct sched_admission *a, enum sched_dir dir)
{
	int best = -1;
	for (unsigned i = 0; i < a->n; i++) {
		const struct entry *x = &a->e[i];
		if (x->dir == dir && !x->running && (best < 0 || ahead(x, &a->e[best])))
			best = (int)i;
	}
	return best;
}

int sched_admission_enqueue(struct sched_admission *a, uint64_t id, enum sched_dir dir,
			    int priority)
{
	if (dir != SCHED_DIR_OUT && dir != SCHED_DIR_IN)
		return -EINVAL;
	if (find(a, id) >= 0)
		return -EEXIST;
	if (a->max[dir] == 0)
		return -EPERM;
	if (a->n == a->cap) {
		unsigned cap = a->cap ? 2 * a->cap : 8;
		struct entry *e = realloc(a->e, cap * sizeof(*e));
		if (!e)
			return -ENOMEM;
		a->e = e;
		a->cap = cap;
	}
	struct entry *x = &a->e[a->n++];
	*x = (struct entry){.id = id, .seq = a->seq++, .priority = priority, .dir = dir};
	/* It starts at once only with a free slot and nobody waiting ahead of it. */
	if (sched_admission_running(a, dir) < a->max[dir] && head_of(a, dir) == (int)(a->n - 1)) {
		x->running = true;
		return 1;
	}
	return 0;
}

int sched_admission_finish(struct sched_admission *a, uint64_t id)
{
	int i = find(a, id);
	if (i < 0)
		return -ENOENT;
	/* Keep the array dense; order in the array means nothing (seq orders the queue). */
	a->e[i] = a->e[--a->n];
	return 0;
}

int sched_admission_next(struct sched_admission *a, uint64_t *ret_id)
{
	for (int d = SCHED_DIR_OUT; d <= SCHED_DIR_IN; d++) {
		if (sched_admission_running(a, (enum sched_dir)d) >= a->max[d])
			continue;
		int h = head_of(a, (enum sched_dir)d);
		if (h < 0)
			continue;
		a->e[h].running = true;
		*ret_id = a->e[h].id;
		return 1;
	}
	return 0;
}

int sched_admission_position(const struct sched_admission *a, uint64_t id)
{
	int i = find(a, id);
	if (i < 0)
		return -ENOENT;
	const struct entry *x = &a->e[i];
	if (x->running)
		return 0;
	int pos = 1;
	for (unsigned j = 0; j < a->n; j++) {
		const struct entry *y = &a->e[j];
		if (y->dir == x->dir && !y->running && ahead(y, x))
			pos++;
	}
	return pos;
}
