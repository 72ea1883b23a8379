/**
 * The main table: every implementation × scenario in this one process, where both AsyncLocalStorages
 * (ours and typeorm-transactional's) are enabled for all of them, floor included. Rounds are interleaved
 * (each round runs one batch of every implementation of a scenario, in a rotating order) and reported as
 * medians; ratios are medians of the per-round ratios to the floor's batch of the same round.
 */
import { IMPLS, makeOps, SCENARIOS, type Backend, type ImplId, type Op, type ScenarioId } from "./backends.js";
import { type RoundCell, runRounds } from "./stats.js";

export interface InProcessOptions {
  readonly rounds: number;
  /** Target duration of one batch. */
  readonly batchMs: number;
}

/** Per backend, scenario and implementation: µs per call, one value per round. */
export type Samples = Map<string, number[]>;

export const key = (backend: string, scenario: ScenarioId, impl: ImplId): string => `${backend}/${scenario}/${impl}`;

type Cell = RoundCell & { readonly op: Op };

export async function runInProcess(
  backends: readonly Backend[],
  options: InProcessOptions,
  log: (line: string) => void,
): Promise<Samples> {
  const groups: Cell[][] = [];
  for (const b of backends) {
    const ops = makeOps(b);
    for (const s of SCENARIOS) {
      const group: Cell[] = [];
      for (const impl of IMPLS) {
        const op = ops[impl.id][s.id];
        if (op !== undefined) group.push({ key: key(b.label, s.id, impl.id), op, calls: 1 });
      }
      groups.push(group);
    }
  }
  // The warm-up run also enables both AsyncLocalStorages before anything is measured.
  return runRounds(groups, options, (round, seconds) =>
    log(`  round ${round}/${options.rounds} done (${seconds.toFixed(1)} s)`),
  );
}
