/* run_threads.h: how many threads run.c uses and where, #included by run.c before generation.
   Only the speed depends on these choices: every thread count gives the same bits. */

/* Decoding threads picked by measurement: a model whose weights fit in one core's cache can lose
   more to the per-layer barriers than a second thread gains, while larger ones gain.
   So when the first timed steps take under TUNE_SMALL_S each, steps alternate, four at a time,
   between all threads and one, and if one thread was clearly faster the rest of the generation
   decodes on one; a gap of TUNE_CLEAR after the first four of each settles it then. Slower
   models never try one thread. Every thread count gives the same bits. */
typedef struct {
    double all_s, one_s; /* time of the steps timed on all threads / on one */
    int off;             /* 1: tuning has stopped */
} DecodeTuner;

#define TUNE_FIRST 2         /* the first steps warm caches and threads; not timed */
#define TUNE_STEPS 32        /* steps timed: 4 on all threads, then one and all by turns */
#define TUNE_SMALL_S 100e-6  /* slower steps than this: a second thread always pays */
#define TUNE_CLEAR 1.25      /* after 4 steps of each, a gap this wide decides at once */

/* Before decode step i: the team for it. */
static void tuner_before(const DecodeTuner *tu, Transformer *t, int i) {
    int phase = i - TUNE_FIRST;
    if (!tu->off && phase >= 0 && phase < TUNE_STEPS) t->state.decode_team = (phase / 4) % 2 ? 1 : 0;
}

/* After decode step i, which took dt seconds. */
static void tuner_after(DecodeTuner *tu, Transformer *t, int i, double dt) {
    int phase = i - TUNE_FIRST;
    if (tu->off || phase < 0 || phase >= TUNE_STEPS) return;
    if (t->state.decode_team == 1) tu->one_s += dt;
    else tu->all_s += dt;
    if (phase == 3 && tu->all_s > 4 * TUNE_SMALL_S) tu->off = 1;
    /* each one-thread step of a model that clearly wants both costs a step's gap, so a clear
       answer ends early */
    if (phase == 7 && (tu->one_s > TUNE_CLEAR * tu->all_s || tu->all_s > TUNE_CLEAR * tu->one_s)) {
        t->state.decode_team = tu->one_s < tu->all_s ? 1 : 0;
        tu->off = 1;
    }
    if (phase == TUNE_STEPS - 1) {
        t->state.decode_team = tu->one_s < 0.9 * tu->all_s ? 1 : 0;
        tu->off = 1;
    }
}

#ifndef TESTING /* main's: harnesses pick their own threads */
/* Threads when OMP_NUM_THREADS is not set: the cores that no other runnable process is using
   right now (at least one), from the kernel's count of runnable tasks (/proc/loadavg's fourth
   field; this process is one of them). OpenMP threads meet at several barriers per layer, and a
   thread that has to share its core with another busy process makes every barrier wait for the
   scheduler: on a busy machine, fewer threads are much faster than one per core. */
#ifdef _OPENMP
static int default_threads(void) {
    int cores = omp_get_num_procs();
    double l1, l5, l15;
    int running = 1, total = 0;
    FILE *f = fopen("/proc/loadavg", "r");
    if (f) {
        if (fscanf(f, "%lf %lf %lf %d/%d", &l1, &l5, &l15, &running, &total) != 5) running = 1;
        fclose(f);
    }
    int idle = cores - (running - 1);
    return idle < 1 ? 1 : (idle > cores ? cores : idle);
}
#endif

/* Pins thread i of the team to the i-th CPU this process may run on, when the team has exactly one
   CPU each and the user has not asked OpenMP for a binding of their own (OMP_PROC_BIND, OMP_PLACES,
   GOMP_CPU_AFFINITY). Why: a VM kernel that packs tasks onto few vCPUs while the machine is idle
   (as on the 2-core benchmark VM) starts both threads on one vCPU, and they share it until the load
   balancer moves one, and a 2-thread prefill can then be slower than one thread. Unpinned threads
   are left alone in every other case: a team smaller than the CPU set (default_threads saw a busy
   machine) should go wherever is free. */
#if defined(_OPENMP) && defined(__linux__)
static void pin_threads(int n_threads) {
    if (n_threads < 2 || getenv("OMP_PROC_BIND") || getenv("OMP_PLACES") || getenv("GOMP_CPU_AFFINITY")) return;
    cpu_set_t allowed;
    if (sched_getaffinity(0, sizeof allowed, &allowed) != 0 || CPU_COUNT(&allowed) != n_threads) return;
    int cpus[CPU_SETSIZE], n = 0;
    for (int cpu = 0; cpu < CPU_SETSIZE && n < n_threads; cpu++)
        if (CPU_ISSET(cpu, &allowed)) cpus[n++] = cpu;
#pragma omp parallel num_threads(n_threads)
    {
        cpu_set_t one;
        CPU_ZERO(&one);
        CPU_SET(cpus[omp_get_thread_num()], &one);
        (void)sched_setaffinity(0, sizeof one, &one); /* 0: the calling thread; a refusal leaves it unpinned */
    }
}
#elif defined(_OPENMP)
static void pin_threads(int n_threads) { (void)n_threads; } /* no portable affinity call elsewhere */
#endif
#endif /* TESTING */
