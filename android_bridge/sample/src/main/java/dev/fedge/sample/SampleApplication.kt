// NOT built in this repository (see ../../../../../../README.md).
package dev.fedge.sample

import android.app.Application
import dev.fedge.android.os.TrainingScheduler

/** Schedules the training job once; from then on every run schedules the next itself. */
class SampleApplication : Application() {
    override fun onCreate() {
        super.onCreate()
        val scheduler = TrainingScheduler(this, SampleTrainingJob::class.java)
        if (scheduler.pending() == null) scheduler.schedule(0.0)
    }
}
