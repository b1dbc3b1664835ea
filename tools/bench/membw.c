/* The memory bandwidth two threads get on this machine: reads a 2 GiB buffer with AVX-512
 * loads four times and prints GB/s for each pass (the first one also faults the pages in).
 * Decoding streams every weight once a token, so its speed follows this figure; BENCHMARKS.md
 * quotes it beside the CPU runs.
 *
 * Build and run: gcc -O2 -mavx512f -mavx512bw -fopenmp tools/bench/membw.c -o /tmp/membw && /tmp/membw
 */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(void) {
    size_t n = 2048UL << 20;
    char *a = aligned_alloc(64, n);
    if (!a) {
        perror("aligned_alloc");
        return 1;
    }
    memset(a, 1, n);
    for (int rep = 0; rep < 4; rep++) {
        double t = omp_get_wtime();
        long long total = 0;
#pragma omp parallel for reduction(+ : total) num_threads(2)
        for (size_t i = 0; i < n; i += 256) {
            __m512i s = _mm512_load_si512(a + i);
            s = _mm512_add_epi8(s, _mm512_load_si512(a + i + 64));
            s = _mm512_add_epi8(s, _mm512_load_si512(a + i + 128));
            s = _mm512_add_epi8(s, _mm512_load_si512(a + i + 192));
            total += _mm512_reduce_add_epi32(s);
        }
        t = omp_get_wtime() - t;
        /* The sum is printed so that the loads cannot be dropped. */
        printf("%.1f GB/s (checksum %lld)\n", n / t / 1e9, total);
    }
    free(a);
    return 0;
}
